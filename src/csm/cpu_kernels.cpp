// Weight-streaming linear layers for x86 CPUs with AVX2, FMA and F16C (built by csm/cpu_kernels.py).
//
// y (M, N) = x (M, K) @ w (N, K)^T for few rows M, with w held as fp16, bf16, int8 (one scale per output
// channel) or int4 (a scale and zero per group of input channels, the portable layout of csm/quant.py).
// Each weight is converted to fp32 in registers as it is read and used for every row of x, so a product
// reads each weight byte once: decoding is bound by memory, and this reads it at close to that bound.
//
// Layout trick: the bf16 and int4 loads yield the even-k weights of a 16-wide block in one vector and the
// odd-k ones in another; x is permuted the same way once per call (it is small), so no shuffle is needed.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Format { F16 = 0, BF16 = 1, I8 = 2, I4 = 3 };

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Each loader turns weights k..k+15 of one output channel into two fp32 vectors (a, b), matching x's
// permuted block (xa, xb), and gives a factor applied to the channel's sum at the end.
struct F16Rows {
  const uint16_t* w;
  int64_t K;
  static constexpr bool permuted = false;
  inline void load(int64_t n, int64_t k, __m256& a, __m256& b) const {
    const uint16_t* p = w + n * K + k;
    a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
  inline float factor(int64_t) const { return 1.0f; }
};

struct BF16Rows {
  const uint16_t* w;
  int64_t K;
  static constexpr bool permuted = true;
  inline void load(int64_t n, int64_t k, __m256& a, __m256& b) const {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + k));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));  // even k: the low half of each 32-bit lane
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  inline float factor(int64_t) const { return 1.0f; }
};

struct I8Rows {
  const int8_t* w;
  const uint16_t* scales;  // bf16 (N,)
  int64_t K;
  static constexpr bool permuted = false;
  inline void load(int64_t n, int64_t k, __m256& a, __m256& b) const {
    const int8_t* p = w + n * K + k;  // each 8-byte load folds into the sign extension
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
  inline float factor(int64_t n) const { return bf16_to_float(scales[n]); }
};

struct I4Rows {
  const uint8_t* w;        // (N, K/2): k even in the low nibble, k odd in the high one
  const uint16_t* scales;  // bf16 (N, K/G)
  const uint16_t* zeros;   // bf16 (N, K/G); w = (q - 8) * scale + zero
  int64_t K;
  int group_shift;
  static constexpr bool permuted = true;
  inline void load(int64_t n, int64_t k, __m256& a, __m256& b) const {
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (n * K + k) / 2));
    __m256i v = _mm256_cvtepu8_epi32(bytes);
    int64_t g = n * (K >> group_shift) + (k >> group_shift);
    float s = bf16_to_float(scales[g]);
    __m256 scale = _mm256_set1_ps(s);
    __m256 offset = _mm256_set1_ps(bf16_to_float(zeros[g]) - 8.0f * s);
    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), scale, offset);
    b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), scale, offset);
  }
  inline float factor(int64_t) const { return 1.0f; }
};

// NB output channels by R rows of x, over the whole of K. With one row, the two halves of a block go to
// accumulators of their own, so that consecutive FMAs do not wait on each other.
template <class W, int NB, int R>
inline void block(const W& w, int64_t n0, const float* x, int64_t K, float* y, int64_t N) {
  constexpr int S = R == 1 ? 2 : 1;
  __m256 acc[NB][R][S];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < S; ++h) acc[j][r][h] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m256 xa[R], xb[R];
    for (int r = 0; r < R; ++r) {
      xa[r] = _mm256_loadu_ps(x + r * K + k);
      xb[r] = _mm256_loadu_ps(x + r * K + k + 8);
    }
    for (int j = 0; j < NB; ++j) {
      __m256 a, b;
      w.load(n0 + j, k, a, b);
      for (int r = 0; r < R; ++r) {
        acc[j][r][0] = _mm256_fmadd_ps(a, xa[r], acc[j][r][0]);
        acc[j][r][S - 1] = _mm256_fmadd_ps(b, xb[r], acc[j][r][S - 1]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    float f = w.factor(n0 + j);
    for (int r = 0; r < R; ++r) {
      __m256 sum = acc[j][r][0];
      if (S == 2) sum = _mm256_add_ps(sum, acc[j][r][S - 1]);
      y[r * N + n0 + j] = hsum(sum) * f;
    }
  }
}

template <class W, int R>
inline void rows(const W& w, int64_t n_begin, int64_t n_end, const float* x, int64_t K, float* y, int64_t N) {
  constexpr int NB = R <= 2 ? 4 : 2;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) block<W, NB, R>(w, n, x, K, y, N);
  for (; n < n_end; ++n) block<W, 1, R>(w, n, x, K, y, N);
}

template <class W>
void run(const W& w, const float* x, int64_t M, int64_t K, float* y, int64_t N) {
  constexpr int64_t CHUNK = 16;  // output channels per task: their weights stay in cache across rows
  int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (K * CHUNK));
  at::parallel_for(0, (N + CHUNK - 1) / CHUNK, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t n0 = c * CHUNK, n1 = std::min(N, n0 + CHUNK);
      for (int64_t m = 0; m < M;) {
        int64_t left = M - m;
        const float* xm = x + m * K;
        float* ym = y + m * N;
        if (left >= 4) {
          rows<W, 4>(w, n0, n1, xm, K, ym, N);
          m += 4;
        } else if (left == 3) {
          rows<W, 3>(w, n0, n1, xm, K, ym, N);
          m += 3;
        } else if (left == 2) {
          rows<W, 2>(w, n0, n1, xm, K, ym, N);
          m += 2;
        } else {
          rows<W, 1>(w, n0, n1, xm, K, ym, N);
          m += 1;
        }
      }
    }
  });
}

// x as fp32, each 16-wide block reordered to (even k, odd k) when the format's loads yield that order.
torch::Tensor kernel_input(const torch::Tensor& x, bool permuted) {
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  if (!permuted) return xf;
  torch::Tensor out = torch::empty_like(xf);
  const float* src = xf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  int64_t blocks = xf.numel() / 16;
  for (int64_t i = 0; i < blocks; ++i) {
    const float* s = src + 16 * i;
    float* d = dst + 16 * i;
    for (int j = 0; j < 8; ++j) {
      d[j] = s[2 * j];
      d[8 + j] = s[2 * j + 1];
    }
  }
  return out;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scales,
                     const c10::optional<torch::Tensor>& zeros, int64_t format, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous 2-D tensor");
  int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 16 == 0, "in_features must be a multiple of 16");
  torch::Tensor y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  auto bf16_ptr = [](const c10::optional<torch::Tensor>& t) {
    TORCH_CHECK(t.has_value() && t->scalar_type() == torch::kBFloat16 && t->is_contiguous(),
                "scales and zeros must be contiguous bf16 tensors");
    return reinterpret_cast<const uint16_t*>(t->data_ptr());
  };
  if (format == F16) {
    TORCH_CHECK(w.scalar_type() == torch::kFloat16 && w.size(1) == K, "w must be fp16 (N, K)");
    torch::Tensor xf = kernel_input(x, F16Rows::permuted);
    F16Rows rows{reinterpret_cast<const uint16_t*>(w.data_ptr()), K};
    run(rows, xf.data_ptr<float>(), M, K, y.data_ptr<float>(), N);
  } else if (format == BF16) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.size(1) == K, "w must be bf16 (N, K)");
    torch::Tensor xf = kernel_input(x, BF16Rows::permuted);
    BF16Rows rows{reinterpret_cast<const uint16_t*>(w.data_ptr()), K};
    run(rows, xf.data_ptr<float>(), M, K, y.data_ptr<float>(), N);
  } else if (format == I8) {
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.size(1) == K, "w must be int8 (N, K)");
    torch::Tensor xf = kernel_input(x, I8Rows::permuted);
    I8Rows rows{w.data_ptr<int8_t>(), bf16_ptr(scales), K};
    run(rows, xf.data_ptr<float>(), M, K, y.data_ptr<float>(), N);
  } else if (format == I4) {
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.size(1) * 2 == K, "w must be uint8 (N, K/2)");
    TORCH_CHECK(group_size >= 16 && (group_size & (group_size - 1)) == 0 && K % group_size == 0,
                "group_size must be a power of two of at least 16 dividing in_features");
    int shift = 0;
    while ((int64_t{1} << shift) < group_size) ++shift;
    torch::Tensor xf = kernel_input(x, I4Rows::permuted);
    I4Rows rows{w.data_ptr<uint8_t>(), bf16_ptr(scales), bf16_ptr(zeros), K, shift};
    run(rows, xf.data_ptr<float>(), M, K, y.data_ptr<float>(), N);
  } else {
    TORCH_CHECK(false, "unknown weight format ", format);
  }
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ dequantized(w)^T for 16-bit, int8 or int4 weights (AVX2, FMA, F16C)");
}
