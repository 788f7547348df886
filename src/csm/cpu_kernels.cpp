// Weight-streaming linear layers for x86 CPUs with AVX2, FMA and F16C (built by csm/cpu_kernels.py).
//
// One source, one build per variant (cpu_kernels.py VARIANTS): the compiler's target macros choose the code.
// - avx2: 256-bit vectors, `maddubs` integer pairs, bf16 widened by shifts.
// - avx512 (AVX-512 F/BW/VL/DQ + VNNI): 16-bit and fp32-converted weights widened 16 to a 512-bit vector;
//   int8 weights meet int8 x in `vpdpbusd` (64 products per instruction), int4 nibbles in 256-bit `vpdpbusd`.
// - avx512bf16 (+ AVX512_BF16): bf16 weights times bf16 x in `vdpbf16ps` (bf16 pairs into fp32 sums).
//
// y (M, N) = x (M, K) @ w (N, K)^T for few rows M, with w held as fp16, bf16, int8 (one scale per output
// channel) or int4 (a scale and zero per group of input channels, the portable layout of csm/quant.py).
// Each weight is read once for every row of x (up to 4 rows a pass), so decoding is bound by memory:
// - fp16 and bf16 weights are converted to fp32 in registers and multiplied in fp32;
// - int8 and int4 weights meet x quantized to int8 (blocks of 32, one fp32 scale each) in 8-bit integer
//   multiply-adds, since converting each of them to fp32 costs more instructions per byte than two AVX2
//   cores can issue at the memory's speed. The fp32 conversion remains for shapes the integer path does not
//   take (and for exact weight-only products).
//
// Layout trick: the bf16 and int4 loads yield the even-k weights of a block in one vector and the odd-k
// ones in another; x is permuted the same way once per call (it is small), so no shuffle is needed.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define CSM_AVX512 1
#else
#define CSM_AVX512 0
#endif
#if CSM_AVX512 && defined(__AVX512BF16__)
#define CSM_BF16DP 1
#else
#define CSM_BF16DP 0
#endif

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

// ---- products in fp32: each weight converted to fp32 in registers -------------------------------------

// NB output channels by R rows of x, over the whole of K. With one row, the two halves of a block go to
// accumulators of their own, so that consecutive FMAs do not wait on each other.
template <class W>
struct FloatDot {
  static constexpr int x_bytes = 4;
  W w;
  const float* x;  // (M, K), permuted as W wants
  float* y;        // (M, N)
  int64_t K, N;

  template <int NB, int R>
  inline void block(int64_t n0, int64_t m) const {
    constexpr int S = R == 1 ? 2 : 1;
    const float* xm = x + m * K;
    __m256 acc[NB][R][S];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < S; ++h) acc[j][r][h] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __m256 xa[R], xb[R];
      for (int r = 0; r < R; ++r) {
        xa[r] = _mm256_loadu_ps(xm + r * K + k);
        xb[r] = _mm256_loadu_ps(xm + r * K + k + 8);
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
        y[(m + r) * N + n0 + j] = hsum(sum) * f;
      }
    }
  }
};

// ---- integer products on quantized activations (int8 and int4 weights) --------------------------------
//
// Converting int8 or int4 weights to fp32 costs more instructions per byte than two cores can issue at the
// memory's speed. Instead each row of x is quantized once per call to int8 in blocks of 32 (d = max|x| / 127,
// q = round(x / d): llama.cpp's q8_0), and weights meet it in 8-bit integer multiply-adds (maddubs: 32
// products and pair sums per instruction), scaled per block in fp32.

constexpr int QB = 32;  // activations per quantization block

struct QuantizedX {
  std::vector<int8_t> q;  // (M, K): natural order, or per 64 k the even k of both blocks, then the odd ones
  std::vector<float> d;   // (M, K/QB) block scales
  std::vector<float> c;   // (M, K/QB) 8 * d * sum(q): the int4 weights' offset of 8, folded out (int4 only)
  std::vector<float> s;   // (M, K/QB) sum of x over the block, for the int4 zeros (int4 only)
  std::vector<float> dd;  // (M, K/64, 16) each pair of blocks' scales, 8 lanes each (int8 on AVX-512 only)
  std::vector<float> corr;  // (M,) 128 * sum over blocks of d * sum(q): the +128 of w's unsigned bytes
};

QuantizedX quantize_rows(const float* x, int64_t M, int64_t K, bool for_int4, bool for_vnni8 = false) {
  QuantizedX out;
  int64_t blocks = M * K / QB;
  out.q.resize(M * K);
  out.d.resize(blocks);
  if (for_int4) {
    out.c.resize(blocks);
    out.s.resize(blocks);
  }
  if (for_vnni8) out.corr.assign(M, 0.0f);
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* p = x + b * QB;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(p + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float top = _mm_cvtss_f32(m4);
    float d = top / 127.0f;
    __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv));  // rounds to nearest (even)
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
    // The packs interleave 128-bit halves; the permute puts the 32 bytes back in k order.
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    packed = _mm256_permutevar8x32_epi32(packed, order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + b * QB), packed);
    out.d[b] = d;
    if (for_vnni8) {
      __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      out.corr[b / (K / QB)] += 128.0f * d * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
    if (for_int4) {  // the sums int4's offset and zeros need (int8 uses neither)
      __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      out.c[b] = 8.0f * d * static_cast<float>(_mm_cvtsi128_si32(s4));
      out.s[b] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    }
  }
  if (for_vnni8) {  // each pair of blocks' scales as one 16-lane vector (lanes 0-7: the first block)
    const int64_t nb = K / QB, pairs = nb / 2;
    out.dd.resize(M * pairs * 16);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < pairs; ++p)
        for (int i = 0; i < 16; ++i) out.dd[(m * pairs + p) * 16 + i] = out.d[m * nb + 2 * p + i / 8];
  }
  if (for_int4) {  // per 64 k: the even k of blocks A and B (32 bytes), then their odd k, as int4 unpacks
    int8_t tmp[64];
    for (int64_t k = 0; k < M * K; k += 64) {
      int8_t* q = out.q.data() + k;
      std::memcpy(tmp, q, 64);
      for (int j = 0; j < 16; ++j) {
        q[j] = tmp[2 * j];
        q[16 + j] = tmp[32 + 2 * j];
        q[32 + j] = tmp[2 * j + 1];
        q[48 + j] = tmp[33 + 2 * j];
      }
    }
  }
  return out;
}

// int8 weights (one scale per output channel) by int8 blocks of x. maddubs takes an unsigned and a signed
// operand: |w| and x with w's sign (|w| <= 128 and |q| <= 127, so its pair sums cannot saturate).
struct Int8Dot {
  static constexpr int x_bytes = 1;
  const int8_t* w;
  const uint16_t* scales;  // bf16 (N,)
  const QuantizedX* x;
  float* y;
  int64_t K, N;

  template <int NB, int R>
  inline void block(int64_t n0, int64_t m) const {
    const int64_t nb = K / QB;
    const int8_t* xq = x->q.data() + m * K;
    const float* xd = x->d.data() + m * nb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NB][R];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256i xv[R];
      __m256 dv[R];
      for (int r = 0; r < R; ++r) {
        xv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QB));
        dv[r] = _mm256_broadcast_ss(xd + r * nb + b);
      }
      for (int j = 0; j < NB; ++j) {
        __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + j) * K + b * QB));
        __m256i aw = _mm256_abs_epi8(wv);
        for (int r = 0; r < R; ++r) {
          __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[r], wv)), ones);
          acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv[r], acc[j][r]);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      float f = bf16_to_float(scales[n0 + j]);
      for (int r = 0; r < R; ++r) y[(m + r) * N + n0 + j] = hsum(acc[j][r]) * f;
    }
  }
};

// Eight bf16 values from p as fp32 (one per block of 32 k when groups are 32 wide), or, for wider groups,
// each group's value repeated for each of its blocks.
inline __m256 group_values(const uint16_t* p, int group_shift) {
  if (group_shift == 5) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  alignas(32) float f[8];
  for (int b = 0; b < 8; ++b) f[b] = bf16_to_float(p[(b * QB) >> group_shift]);
  return _mm256_load_ps(f);
}

// int4 weights (w = (q - 8) * scale + zero per group) by int8 blocks of x, 256 k at a time. The low and
// high nibbles of 32 bytes are the even and odd k of two blocks; x is ordered to match (quantize_rows).
// Per block: sum(w x) = scale * d * (sum(q qx) - 8 sum(qx)) + zero * sum(x).
struct Int4Dot {
  static constexpr int x_bytes = 1;
  const uint8_t* w;        // (N, K/2)
  const uint16_t* scales;  // bf16 (N, K/G)
  const uint16_t* zeros;
  int group_shift;
  const QuantizedX* x;
  float* y;
  int64_t K, N;

  template <int NB, int R>
  inline void block(int64_t n0, int64_t m) const {
    const int64_t nb = K / QB, groups = K >> group_shift;
    const int8_t* xq = x->q.data() + m * K;
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // hadd's block order -> k order
    __m256 acc[NB][R];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 256) {
      const int64_t b = k / QB;
      for (int j = 0; j < NB; ++j) {
        const uint8_t* p = w + (n0 + j) * (K / 2) + k / 2;
        // 2 KB ahead (the stream runs on into the next channel's row): +15-35% on int4, which the hardware
        // prefetcher alone leaves short of the memory's speed; no gain for the other formats.
        _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p) + 2048 + 64, _MM_HINT_T0);
        __m256i lo[4], hi[4];
        for (int i = 0; i < 4; ++i) {
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i));
          lo[i] = _mm256_and_si256(v, low4);
          hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        const int64_t g = (n0 + j) * groups + (k >> group_shift);
        __m256 sv = group_values(scales + g, group_shift), zv = group_values(zeros + g, group_shift);
        for (int r = 0; r < R; ++r) {
          const int8_t* xr = xq + r * K + k;
          __m256i part[4];
          for (int i = 0; i < 4; ++i) {
            __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 64 * i));
            __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 64 * i + 32));
#if CSM_AVX512  // the same sums, 4 products a lane in one instruction
            part[i] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[i], xe), hi[i], xo);
#else
            __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[i], xe), _mm256_maddubs_epi16(hi[i], xo));
            part[i] = _mm256_madd_epi16(pairs, ones);  // lanes 0-3: block 2i, 4-7: block 2i+1
#endif
          }
          __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(part[0], part[1]), _mm256_hadd_epi32(part[2], part[3]));
          sums = _mm256_permutevar8x32_epi32(sums, order);  // the 8 blocks' sum(q qx), in k order
          const int64_t at = (m + r) * nb + b;
          __m256 t = _mm256_fmsub_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(x->d.data() + at),
                                     _mm256_loadu_ps(x->c.data() + at));
          acc[j][r] = _mm256_fmadd_ps(sv, t, acc[j][r]);
          acc[j][r] = _mm256_fmadd_ps(zv, _mm256_loadu_ps(x->s.data() + at), acc[j][r]);
        }
      }
    }
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) y[(m + r) * N + n0 + j] = hsum(acc[j][r]);
  }
};

#if CSM_AVX512
// ---- AVX-512: 16 weights a vector ------------------------------------------------------------------

// Each loader turns weights k..k+15 of one output channel into one fp32 vector, in k order.
struct F16Rows512 {
  const uint16_t* w;
  int64_t K;
  inline __m512 load(int64_t n, int64_t k) const {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + k)));
  }
  inline float factor(int64_t) const { return 1.0f; }
};

struct BF16Rows512 {
  const uint16_t* w;
  int64_t K;
  inline __m512 load(int64_t n, int64_t k) const {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + k)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  inline float factor(int64_t) const { return 1.0f; }
};

struct I8Rows512 {
  const int8_t* w;
  const uint16_t* scales;
  int64_t K;
  inline __m512 load(int64_t n, int64_t k) const {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * K + k))));
  }
  inline float factor(int64_t n) const { return bf16_to_float(scales[n]); }
};

// As FloatDot, 16 k a step; one row keeps two accumulators (even and odd steps).
template <class W>
struct FloatDot512 {
  static constexpr int x_bytes = 4;
  W w;
  const float* x;  // (M, K), k order
  float* y;
  int64_t K, N;

  template <int NB, int R>
  inline void block(int64_t n0, int64_t m) const {
    constexpr int S = R == 1 ? 2 : 1;
    const float* xm = x + m * K;
    __m512 acc[NB][R][S];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < S; ++h) acc[j][r][h] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512 xa[R], xb[R];
      for (int r = 0; r < R; ++r) {
        xa[r] = _mm512_loadu_ps(xm + r * K + k);
        xb[r] = _mm512_loadu_ps(xm + r * K + k + 16);
      }
      for (int j = 0; j < NB; ++j) {
        __m512 a = w.load(n0 + j, k), b = w.load(n0 + j, k + 16);
        for (int r = 0; r < R; ++r) {
          acc[j][r][0] = _mm512_fmadd_ps(a, xa[r], acc[j][r][0]);
          acc[j][r][S - 1] = _mm512_fmadd_ps(b, xb[r], acc[j][r][S - 1]);
        }
      }
    }
    if (k < K) {  // K is a multiple of 16
      for (int j = 0; j < NB; ++j) {
        __m512 a = w.load(n0 + j, k);
        for (int r = 0; r < R; ++r) acc[j][r][0] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xm + r * K + k), acc[j][r][0]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      float f = w.factor(n0 + j);
      for (int r = 0; r < R; ++r) {
        __m512 sum = acc[j][r][0];
        if (S == 2) sum = _mm512_add_ps(sum, acc[j][r][S - 1]);
        y[(m + r) * N + n0 + j] = _mm512_reduce_add_ps(sum) * f;
      }
    }
  }
};

// int8 weights by int8 blocks of x in vpdpbusd, two blocks (64 bytes) a step. vpdpbusd takes an unsigned
// and a signed operand: w + 128 as unsigned bytes (one xor, shared by all rows) and x; the + 128 adds
// 128 * sum(q) * d per block to a row's sum whatever the channel, taken off once at the end (corr).
struct Int8Dot512 {
  static constexpr int x_bytes = 1;
  const int8_t* w;
  const uint16_t* scales;  // bf16 (N,)
  const QuantizedX* x;
  float* y;
  int64_t K, N;

  template <int NB, int R>
  inline void block(int64_t n0, int64_t m) const {
    const int64_t nb = K / QB, pairs = nb / 2;
    const int8_t* xq = x->q.data() + m * K;
    const float* dd = x->dd.data() + m * pairs * 16;
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512 acc[NB][R];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      __m512i xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_si512(xq + r * K + 64 * p);
      for (int j = 0; j < NB; ++j) {
        __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w + (n0 + j) * K + 64 * p), flip);
        for (int r = 0; r < R; ++r) {
          __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv[r]);
          acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(dd + r * pairs * 16 + 16 * p), acc[j][r]);
        }
      }
    }
    float tail[NB][R] = {};
    if (nb % 2) {  // the last block alone, in 256 bits
      const int64_t b = nb - 1;
      const __m256i flip8 = _mm256_set1_epi8(static_cast<char>(0x80));
      for (int j = 0; j < NB; ++j) {
        __m256i wu = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + j) * K + QB * b)), flip8);
        for (int r = 0; r < R; ++r) {
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + QB * b));
          __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, xv);
          tail[j][r] = hsum(_mm256_cvtepi32_ps(s)) * x->d[(m + r) * nb + b];
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      float f = bf16_to_float(scales[n0 + j]);
      for (int r = 0; r < R; ++r)
        y[(m + r) * N + n0 + j] = (_mm512_reduce_add_ps(acc[j][r]) + tail[j][r] - x->corr[m + r]) * f;
    }
  }
};
#endif

#if CSM_BF16DP
// bf16 weights by bf16 x in vdpbf16ps: 32 k (a pair of bf16 a lane) per instruction into fp32 sums. Each
// product of two bf16 values is exact in fp32; x is used as given (no rounding: only for bf16 x).
struct Bf16Dot512 {
  static constexpr int x_bytes = 2;
  const uint16_t* w;
  const uint16_t* x;  // (M, K) bf16
  float* y;
  int64_t K, N;

  template <int NB, int R>
  inline void block(int64_t n0, int64_t m) const {
    constexpr int S = R == 1 ? 2 : 1;
    const uint16_t* xm = x + m * K;
    __m512 acc[NB][R][S];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < S; ++h) acc[j][r][h] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      __m512bh xa[R], xb[R];
      for (int r = 0; r < R; ++r) {
        xa[r] = (__m512bh)_mm512_loadu_si512(xm + r * K + k);
        xb[r] = (__m512bh)_mm512_loadu_si512(xm + r * K + k + 32);
      }
      for (int j = 0; j < NB; ++j) {
        const uint16_t* p = w + (n0 + j) * K + k;
        __m512bh a = (__m512bh)_mm512_loadu_si512(p), b = (__m512bh)_mm512_loadu_si512(p + 32);
        for (int r = 0; r < R; ++r) {
          acc[j][r][0] = _mm512_dpbf16_ps(acc[j][r][0], a, xa[r]);
          acc[j][r][S - 1] = _mm512_dpbf16_ps(acc[j][r][S - 1], b, xb[r]);
        }
      }
    }
    for (; k < K; k += 32) {  // 16 or 32 k left: masked loads (zeros beyond K)
      const __mmask32 mask = K - k >= 32 ? 0xFFFFFFFFu : 0xFFFFu;
      for (int j = 0; j < NB; ++j) {
        __m512bh a = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n0 + j) * K + k);
        for (int r = 0; r < R; ++r)
          acc[j][r][0] =
              _mm512_dpbf16_ps(acc[j][r][0], a, (__m512bh)_mm512_maskz_loadu_epi16(mask, xm + r * K + k));
      }
    }
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) {
        __m512 sum = acc[j][r][0];
        if (S == 2) sum = _mm512_add_ps(sum, acc[j][r][S - 1]);
        y[(m + r) * N + n0 + j] = _mm512_reduce_add_ps(sum);
      }
  }
};
#endif

// ---- scheduling: output channels split among threads, rows of x in passes of up to 4 -------------------

template <class D, int NB, int R>
inline void rows_by(const D& d, int64_t n_begin, int64_t n_end, int64_t m) {
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) d.template block<NB, R>(n, m);
  for (; n < n_end; ++n) d.template block<1, R>(n, m);
}

// One row reads one output channel at a time (a single stream through memory: interleaved streams of a
// few KB each defeat the prefetcher), unless x's row outgrows L1 (fp32 x past 2048 k): then x would be
// read from L2 for every channel, and 8 channels share each load of it.
constexpr int64_t X_IN_L1 = 8192;  // bytes

template <class D, int R>
inline void rows(const D& d, int64_t n_begin, int64_t n_end, int64_t m) {
  if (R > 1) {
    rows_by<D, (R <= 2 ? 4 : 2), R>(d, n_begin, n_end, m);
  } else if (d.K * D::x_bytes > X_IN_L1) {
    rows_by<D, 8, 1>(d, n_begin, n_end, m);
  } else {
    rows_by<D, 1, 1>(d, n_begin, n_end, m);
  }
}

template <class D>
void run(const D& d, int64_t M, int64_t bytes_per_channel, int64_t N) {
  constexpr int64_t CHUNK = 16;  // output channels per task: their weights stay in cache across rows
  int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (bytes_per_channel * CHUNK));
  at::parallel_for(0, (N + CHUNK - 1) / CHUNK, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t n0 = c * CHUNK, n1 = std::min(N, n0 + CHUNK);
      for (int64_t m = 0; m < M;) {
        int64_t left = M - m;
        if (left >= 4) {
          rows<D, 4>(d, n0, n1, m);
          m += 4;
        } else if (left == 3) {
          rows<D, 3>(d, n0, n1, m);
          m += 3;
        } else if (left == 2) {
          rows<D, 2>(d, n0, n1, m);
          m += 2;
        } else {
          rows<D, 1>(d, n0, n1, m);
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

template <class W>
void float_product(const W& w, const torch::Tensor& x, torch::Tensor& y, int64_t bytes_per_channel) {
  torch::Tensor xf = kernel_input(x, W::permuted);
  FloatDot<W> d{w, xf.data_ptr<float>(), y.data_ptr<float>(), x.size(1), y.size(1)};
  run(d, x.size(0), bytes_per_channel, y.size(1));
}

#if CSM_AVX512
template <class W>
void float_product512(const W& w, const torch::Tensor& x, torch::Tensor& y, int64_t bytes_per_channel) {
  torch::Tensor xf = x.to(torch::kFloat32).contiguous();
  FloatDot512<W> d{w, xf.data_ptr<float>(), y.data_ptr<float>(), x.size(1), y.size(1)};
  run(d, x.size(0), bytes_per_channel, y.size(1));
}
#endif

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scales,
                     const c10::optional<torch::Tensor>& zeros, int64_t format, int64_t group_size,
                     bool integer) {
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
#if CSM_AVX512
    float_product512(F16Rows512{reinterpret_cast<const uint16_t*>(w.data_ptr()), K}, x, y, 2 * K);
#else
    float_product(F16Rows{reinterpret_cast<const uint16_t*>(w.data_ptr()), K}, x, y, 2 * K);
#endif
  } else if (format == BF16) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.size(1) == K, "w must be bf16 (N, K)");
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
#if CSM_BF16DP
    if (x.scalar_type() == torch::kBFloat16) {  // bf16 x: bf16 pairs straight into fp32 sums
      torch::Tensor xb = x.contiguous();
      Bf16Dot512 d{wp, reinterpret_cast<const uint16_t*>(xb.data_ptr()), y.data_ptr<float>(), K, N};
      run(d, M, 2 * K, N);
      return y.to(x.scalar_type());
    }
#endif
#if CSM_AVX512
    float_product512(BF16Rows512{wp, K}, x, y, 2 * K);
#else
    float_product(BF16Rows{wp, K}, x, y, 2 * K);
#endif
  } else if (format == I8) {
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.size(1) == K, "w must be int8 (N, K)");
    if (integer && K % QB == 0) {
      torch::Tensor xf = x.to(torch::kFloat32).contiguous();
#if CSM_AVX512
      QuantizedX qx = quantize_rows(xf.data_ptr<float>(), M, K, false, true);
      Int8Dot512 d{w.data_ptr<int8_t>(), bf16_ptr(scales), &qx, y.data_ptr<float>(), K, N};
#else
      QuantizedX qx = quantize_rows(xf.data_ptr<float>(), M, K, false);
      Int8Dot d{w.data_ptr<int8_t>(), bf16_ptr(scales), &qx, y.data_ptr<float>(), K, N};
#endif
      run(d, M, K, N);
    } else {
#if CSM_AVX512
      float_product512(I8Rows512{w.data_ptr<int8_t>(), bf16_ptr(scales), K}, x, y, K);
#else
      float_product(I8Rows{w.data_ptr<int8_t>(), bf16_ptr(scales), K}, x, y, K);
#endif
    }
  } else if (format == I4) {
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.size(1) * 2 == K, "w must be uint8 (N, K/2)");
    TORCH_CHECK(group_size >= 16 && (group_size & (group_size - 1)) == 0 && K % group_size == 0,
                "group_size must be a power of two of at least 16 dividing in_features");
    int shift = 0;
    while ((int64_t{1} << shift) < group_size) ++shift;
    if (integer && K % 256 == 0 && group_size >= QB) {
      torch::Tensor xf = x.to(torch::kFloat32).contiguous();
      QuantizedX qx = quantize_rows(xf.data_ptr<float>(), M, K, true);
      Int4Dot d{w.data_ptr<uint8_t>(), bf16_ptr(scales), bf16_ptr(zeros), shift, &qx, y.data_ptr<float>(), K, N};
      run(d, M, K / 2, N);
    } else {
      float_product(I4Rows{w.data_ptr<uint8_t>(), bf16_ptr(scales), bf16_ptr(zeros), K, shift}, x, y, K / 2);
    }
  } else {
    TORCH_CHECK(false, "unknown weight format ", format);
  }
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("variant") = CSM_BF16DP ? "avx512bf16" : CSM_AVX512 ? "avx512" : "avx2";
  m.def("linear", &linear,
        "y = x @ dequantized(w)^T for 16-bit, int8 or int4 weights (AVX2, FMA, F16C); integer: int8 and int4 "
        "weights meet x quantized to int8 in blocks of 32");
}
