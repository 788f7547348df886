"""The frame engine: static caches, one frame step (backbone + depth decoder), on-device sampling, CUDA graphs.

The engine knows nothing about text or waveforms: it sees embeddings in and codes out. Every tensor it
touches per frame is preallocated; a frame runs without host-device synchronisation. Rows have their own
cache slot and RoPE position, so a row can join a batch between frames (continuous batching).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import prefix_cache
from .cuda_graph import CUDAGraphed, graphs_enabled
from .frames import FrameRule
from .llama import additive_mask, fuse_projections

# CUDA graphs (csm.cuda_graph) replay the frame step on CUDA unless a caller says cuda_graph=False;
# CSM_CUDA_GRAPH=0 (or NO_CUDA_GRAPH=1) turns them off for every caller. On since bench/gpu_suite.sh showed
# graphed codes == eager codes in fp32 on an H200 (BENCHMARKS.md).
CUDA_GRAPH_DEFAULT = True
# torch.compile (inductor) of the frame step when a caller passes compile=None: off until a GPU run shows it
# faster than the graphed eager step (bench/bench_gpu.py, "ours compiled"); CSM_COMPILE=1 turns it on.
COMPILE_DEFAULT = False
# A graphed engine steps its rows in use in the smallest of these that holds them, one graph each.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Sampling:
    """How one token is drawn: greedy, or temperature then top-k then top-p (the reference's order)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0

    def validate(self, who: str) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"{who}temperature must be > 0 when sampling (got {self.temperature}); use do_sample=False for greedy"
            )
        if self.top_k < 0:
            raise ValueError(f"{who}top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{who}top_p must be in (0, 1], got {self.top_p}")


class RowSampling:
    """Per-row sampling parameters as tensors, so rows with different settings share one step."""

    def __init__(self, batch_size: int, vocab_size: int, device):
        self.vocab_size = vocab_size
        self.do_sample = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.temperature = torch.ones(batch_size, 1, device=device)
        self.top_k = torch.full((batch_size, 1), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch_size, 1, device=device)
        self.max_top_k = 1
        self.any_top_p = False
        self.any_sample = False

    def set(self, rows: slice | int, s: Sampling) -> None:
        self.do_sample[rows] = s.do_sample
        self.temperature[rows] = s.temperature if s.do_sample else 1.0
        k = s.top_k if 0 < s.top_k < self.vocab_size else self.vocab_size
        self.top_k[rows] = k
        self.top_p[rows] = s.top_p
        self.max_top_k = max(self.max_top_k, k)
        self.any_top_p = self.any_top_p or s.top_p < 1.0
        self.any_sample = self.any_sample or s.do_sample

    def rows(self, n: int) -> RowSampling:
        """The first n rows, sharing this object's tensors (so `set` still reaches them), with the largest
        top-k rounded up to a power of two: a graph captured for it serves every smaller top-k."""
        view = RowSampling.__new__(RowSampling)
        view.vocab_size, view.any_top_p, view.any_sample = self.vocab_size, self.any_top_p, self.any_sample
        view.do_sample, view.temperature = self.do_sample[:n], self.temperature[:n]
        view.top_k, view.top_p = self.top_k[:n], self.top_p[:n]
        view.max_top_k = min(1 << (self.max_top_k - 1).bit_length(), self.vocab_size)
        return view

    def key(self) -> tuple:
        """What a captured step bakes in besides tensors."""
        return (self.max_top_k, self.any_top_p, self.any_sample)


def sample(logits: torch.Tensor, p: RowSampling, noise: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from logits (B, V); noise (B, V) holds Exp(1) draws, so the step stays pure."""
    if not p.any_sample:
        return logits.argmax(-1)  # the fp32 argmax: a cast keeps the order (and ties) of any float dtype
    logits = logits.float()
    greedy = logits.argmax(-1)
    scaled = logits / p.temperature
    top = torch.topk(scaled, p.max_top_k, dim=-1).values  # (B, k) descending
    kth = top.gather(1, (p.top_k.clamp(max=p.max_top_k) - 1))
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.any_top_p:
        probs, order = scaled.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) > p.top_p  # keep the smallest prefix reaching top_p
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race), with no host sync.
    sampled = (scaled.softmax(-1) / noise).argmax(-1)
    return torch.where(p.do_sample, sampled, greedy)


class FrameEngine:
    """Static caches and per-row state for generating audio frames for up to `batch_size` rows.

    Rows have their own cache slot and RoPE position, so a row can be prefilled alone and join a batch
    that is already generating (continuous batching), or a whole left-padded batch prefilled at once.

    `cuda_graph=True` on CUDA replays the eager step as CUDA graphs: the step then sees static shapes (the
    whole cache, a fixed noise buffer) and runs the rows in use (up to the last one prefilled and not
    freed) in the smallest of GRAPH_BUCKETS that holds them, one graph per bucket, captured at first use.
    """

    def __init__(
        self, model, batch_size: int, max_seq_len: int, compile: bool = False, cuda_graph: bool = False
    ):
        cfg = model.config
        self.model, self.batch_size, self.max_seq_len = model, batch_size, max_seq_len
        self.K, self.V = cfg.num_codebooks, cfg.vocab_size
        self.rule = FrameRule.of(model)
        ids = self.rule.codebook_size  # what sampling may draw
        device, dtype = model.device, model.dtype
        model.backbone_model.setup_caches(batch_size, max_seq_len, dtype, device)
        model.depth_decoder.model.setup_caches(batch_size, self.K, dtype, device)
        self.caches = [layer.self_attn.kv_cache for layer in self.layers()]
        self.valid = torch.zeros(
            batch_size, max_seq_len, dtype=torch.bool, device=device
        )  # keys a row may see
        self.slot = torch.zeros(batch_size, dtype=torch.long, device=device)  # next cache slot per row
        self.position = torch.zeros(batch_size, dtype=torch.long, device=device)  # next RoPE position per row
        self.hidden = torch.zeros(
            batch_size, cfg.hidden_size, dtype=dtype, device=device
        )  # last backbone state
        self.finished = torch.ones(batch_size, dtype=torch.bool, device=device)
        # Per row, an upper bound on its next cache slot, kept on the host: an eager step attends over
        # the slots any row may use, not the whole cache.
        self.next_slot_bound = [0] * batch_size
        fuse_projections(model)  # in case a layer's weight was replaced since the model was built
        self.compiled = compile and os.environ.get("NO_TORCH_COMPILE") != "1"
        self.backbone_sampling = RowSampling(batch_size, ids, device)
        self.depth_sampling = RowSampling(batch_size, ids, device)
        # Additive: attention adds it as it is, no per-layer conversion of a boolean mask.
        self.depth_causal = additive_mask(
            torch.ones(self.K, self.K, dtype=torch.bool, device=device).tril(), dtype
        )
        self.depth_slots = torch.arange(self.K, device=device)
        self.unit_noise = torch.ones(batch_size, self.K, ids, device=device)
        self.step = self._frame
        self.graphed = cuda_graph and graphs_enabled(device)
        self.graphs: dict[tuple, CUDAGraphed] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.graphed and device.type == "cuda" else None
        self.timings = StartTimings(load_s=getattr(model, "load_seconds", None))
        self.n_backbone = len(model.backbone_model.layers)
        self.pending: dict[int, _Pending] = {}  # rows whose prompt is being prefilled, slice by slice
        self.prompts: list[_Pending | None] = [None] * batch_size  # each row's prompt, for keep_generated
        if model.prepack_weights and not self.compiled:
            model.prepack(fp32=False)  # fp32: read plain, no second copy (csm.llama)
        if self.compiled:
            use_inductor_cache()
            # CUDA: the compiled step is captured in our CUDA graphs, one per bucket. CPU: a C++ wrapper
            # calls the kernels, since a frame is thousands of tiny kernels and a Python wrapper costs ~1.6x
            # the time (BENCHMARKS.md).
            how = {} if device.type == "cuda" else {"options": {"cpp_wrapper": True}}
            self.step = torch.compile(self._frame, fullgraph=True, **how)

    def layers(self):
        return [*self.model.backbone_model.layers, *self.model.depth_decoder.model.layers]

    def install(self) -> None:
        """Point the model's layers at this engine's caches (another engine may have replaced them)."""
        for layer, cache in zip(self.layers(), self.caches):
            layer.self_attn.kv_cache = cache

    # ---- prefill ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows: slice | None = None,
        content: torch.Tensor | None = None,
    ) -> None:
        """Run the prompt embeds (b, T, D) for rows `rows` (default: all), left padding given by attention_mask.

        With `content` (b, T, 1 + K), what each position holds (csm.prefix_cache), rows without padding take
        over the longest stored prefix of their prompt and prefill only the rest, one row at a time; the
        segments they read are stored for the next prompts. Padded rows are prefilled together, as without it.
        """
        rows = rows or slice(0, embeds.shape[0])
        self.install()
        b, T, _ = embeds.shape
        device = embeds.device
        unpadded = attention_mask is None or bool(attention_mask.bool().all())
        if content is not None and unpadded and prefix_cache.store_for(self.model) is not None:
            for i, row in enumerate(range(*rows.indices(self.batch_size))):
                if self.begin_prefill(row, embeds[i : i + 1], content[i]):
                    self.prefill_step(row, T)
            return
        if attention_mask is None:
            attention_mask = torch.ones(b, T, dtype=torch.long, device=device)
        attention_mask = attention_mask.bool()
        # The reference's positions under padding: real tokens count from 0, padded ones sit at 0.
        positions = torch.where(attention_mask, attention_mask.long().cumsum(-1) - 1, 0)
        valid = self.valid[rows]
        valid.zero_()
        valid[:, :T] = attention_mask
        slots, steps = torch.arange(T, device=device)[None], torch.arange(T, device=device)[:, None]
        # A padded query sees no padded key (itself included): fully masked under left padding, as the
        # reference's attention, which gives such a row zeros.
        mask = valid[:, None, None, :T] & (slots <= steps)
        backbone = self.model.backbone_model
        with kv_rows(backbone, rows):
            h = backbone.run_layers(embeds, positions, mask, torch.arange(T, device=device))
        self.hidden[rows] = h[:, -1]
        self.slot[rows] = T
        self.position[rows] = positions[:, -1] + 1  # after right padding: 1, as the reference counts on
        self.finished[rows] = False
        for row in range(*rows.indices(self.batch_size)):
            self.next_slot_bound[row] = T
            self.pending.pop(row, None)
            self.prompts[row] = None

    @torch.inference_mode()
    def begin_prefill(self, row: int, embeds: torch.Tensor, content: torch.Tensor | None = None) -> int:
        """Start prefilling one row's prompt embeds (1, T, D), unpadded: the longest stored prefix of its
        `content` (T, 1 + K) is copied into the row's cache. Returns the positions left to prefill
        (`prefill_step`); at 0 the row is ready to generate. Until then the row takes no part in frames."""
        self.install()
        T = embeds.shape[1]
        cfg = self.model.config
        job = _Pending(embeds, T)
        store = prefix_cache.store_for(self.model) if content is not None else None
        if store is not None:
            job.content = content.cpu()
            job.starts = prefix_cache.cuts(job.content, cfg.bos_token_id, cfg.audio_eos_token_id)
            job.root = prefix_cache.weights_key(self.model)
            hit = store.lookup(job.content, job.starts, job.root)
            at = 0
            for block in hit.blocks:
                for kv, n in store.pieces(block):  # (L, 2, KV, n, D) a page at a time
                    for layer, cache in zip(range(self.n_backbone), self.caches):
                        cache.k_cache[row, :, at : at + n] = kv[layer, 0]
                        cache.v_cache[row, :, at : at + n] = kv[layer, 1]
                    at += n
            job.done, job.last = hit.positions, hit.hidden
        self.valid[row].zero_()
        self.valid[row, : job.done] = True
        self.finished[row] = True  # frames skip it (pad) until its prompt is in
        # A frame step meanwhile writes this row's (ignored) keys at the next slot to prefill, which the
        # next slice overwrites.
        self.slot[row] = self.position[row] = job.done
        self.next_slot_bound[row] = max(job.done, 1)
        self.pending[row] = job
        self.prompts[row] = None
        if job.done == T:
            self._ready(row)
        return T - job.done

    @torch.inference_mode()
    def prefill_step(self, row: int, max_positions: int) -> int:
        """Prefill up to `max_positions` more positions of a row begun with `begin_prefill`; returns the
        positions left (0: the row generates from the next frame on)."""
        job = self.pending[row]
        start = job.done
        stop = min(job.length, start + max(1, max_positions))
        device = job.embeds.device
        pos = torch.arange(start, stop, device=device)
        keys = torch.arange(stop, device=device)
        mask = (keys[None, :] <= pos[:, None])[None, None]  # (1, 1, n, stop): causal over the whole cache
        backbone = self.model.backbone_model
        with kv_rows(backbone, slice(row, row + 1)):
            h = backbone.run_layers(job.embeds[:, start:stop], pos, mask, pos)
        if job.content is not None:  # the state after each segment's last position, for the store
            for s in [*job.starts[1:], job.length]:
                if start < s <= stop:
                    job.hidden_at[s - 1] = h[0, s - 1 - start]
        job.last = h[0, -1]
        job.done = stop
        self.valid[row, start:stop] = True
        self.slot[row] = self.position[row] = stop
        self.next_slot_bound[row] = stop
        if stop == job.length:
            self._ready(row)
        return job.length - stop

    def _ready(self, row: int) -> None:
        """A row's prompt is in: it generates from the next frame on; its new segments go to the store."""
        job = self.pending.pop(row)
        T = job.length
        self.hidden[row] = job.last
        self.slot[row] = self.position[row] = T
        self.next_slot_bound[row] = T
        self.finished[row] = False
        store = prefix_cache.store_for(self.model) if job.content is not None else None
        if store is not None:
            store.insert(
                job.content, job.starts, T, job.root, lambda a, b: self.read_kv(row, a, b), job.hidden_at.get
            )
            job.embeds, job.hidden_at = None, {}
            self.prompts[row] = job

    def read_kv(self, row: int, start: int, stop: int) -> torch.Tensor:
        """A copy of a row's backbone keys and values at slots [start, stop): (L, 2, KV heads, n, D), one
        allocation (a store of many blocks should not be fragmented by temporaries)."""
        first = self.caches[0].k_cache
        out = first.new_empty(self.n_backbone, 2, first.shape[1], stop - start, first.shape[3])
        for layer, c in enumerate(self.caches[: self.n_backbone]):
            out[layer, 0].copy_(c.k_cache[row, :, start:stop])
            out[layer, 1].copy_(c.v_cache[row, :, start:stop])
        return out

    @torch.inference_mode()
    def keep_generated(self, row: int, frames: torch.Tensor) -> None:
        """Store a row's generated turn, its prompt's last segment and `frames` (F, K) (the frames before its
        end-of-audio frame), for a next prompt that has this turn as context. Call before the row is freed."""
        job = self.prompts[row]
        store = prefix_cache.store_for(self.model)
        if job is None or store is None or len(frames) == 0:
            return
        ids = torch.full((len(frames), 1), self.model.config.audio_token_id, dtype=torch.long)
        content = torch.cat([job.content, torch.cat([ids, frames.to("cpu", torch.long)], 1)])
        end = job.length + len(frames)
        if end > self.max_seq_len:
            return
        store.insert(content, job.starts, end, job.root, lambda a, b: self.read_kv(row, a, b))

    # ---- one frame ----------------------------------------------------------------------------------

    def _frame(self, hidden, slot, position, valid, noise, backbone_sampling=None, depth_sampling=None):
        """One frame for every row: codebook 0 from the backbone state, 1..K-1 from the depth decoder,
        then the backbone consumes the frame. Returns (codes (B, K), next hidden (B, D), valid keys)."""
        backbone_sampling = backbone_sampling or self.backbone_sampling
        depth_sampling = depth_sampling or self.depth_sampling
        m = self.model
        dd = m.depth_decoder.model
        head = m.depth_decoder.codebooks_head
        decodable = self.rule.decodable_logits
        c = sample(decodable(m.lm_head(hidden)), backbone_sampling, noise[:, 0])
        codes = [c]
        x = torch.stack([hidden, dd.embed_tokens(c).to(hidden.dtype)], 1)  # positions 0 and 1
        h = dd.run_layers(
            dd.inputs_embeds_projector(x),
            self.depth_slots[:2],
            self.depth_causal[None, None, :2, :2],
            self.depth_slots[:2],
        )
        for i in range(1, self.K):
            c = sample(decodable(head.logits(h[:, -1], i)), depth_sampling, noise[:, i])
            codes.append(c)
            if i == self.K - 1:
                break
            # Codebook i sits at depth position i + 1; the cache is rewound per frame, not cleared.
            x = F.embedding(c, dd.embed_tokens.weight[i * self.V : (i + 1) * self.V])[:, None]
            pos = self.depth_slots[i + 1 : i + 2]
            h = dd.run_layers(
                dd.inputs_embeds_projector(x), pos, self.depth_causal[None, None, i + 1 : i + 2, : i + 2], pos
            )
        frame = torch.stack(codes, 1)  # (B, K)
        backbone = m.backbone_model
        valid = valid.scatter(1, slot[:, None], True)
        mask = additive_mask(valid[:, None, None, :], hidden.dtype)  # once for every layer
        h = backbone.run_layers(backbone.embed_tokens(frame[:, None]), position[:, None], mask, slot[:, None])
        return frame, h[:, -1], valid

    @torch.inference_mode()
    def next_frame(self, generator: torch.Generator | list | None = None) -> torch.Tensor:
        """Advance every row by one frame; returns the codes (B, K) (finished rows give pad frames).

        `generator` draws the sampling noise: one for the whole batch, or a list with one per row, so that
        a row's draws depend on its own generator alone, whatever else shares the batch.
        """
        noise = self.unit_noise
        if self.backbone_sampling.any_sample or self.depth_sampling.any_sample:
            noise = torch.empty_like(noise)
            if isinstance(generator, (list, tuple)):
                for row, g in enumerate(generator):
                    noise[row].exponential_(generator=g)
            else:
                noise.exponential_(generator=generator)
        b = self.batch_size
        if self.graphed:
            b = self.rows_bucket()
            n = self.max_seq_len
            step = self._graph_for(b)  # captured (and compiled) at the bucket's first use
            frame, hidden, valid = step(
                self.hidden[:b], self.slot[:b], self.position[:b], self.valid[:b], noise[:b]
            )
        else:
            # Eager steps see the cache slots in use; a compiled step keeps one static shape.
            n = self.max_seq_len if self.compiled else min(max(self.next_slot_bound) + 1, self.max_seq_len)
            frame, hidden, valid = self.step(self.hidden, self.slot, self.position, self.valid[:, :n], noise)
        self.next_slot_bound = [min(s + 1, self.max_seq_len - 1) if s else 0 for s in self.next_slot_bound]
        if b < self.batch_size:  # rows past the bucket are free: they give pad frames
            frame = torch.cat([frame, frame.new_full((self.batch_size - b, self.K), self.rule.pad)])
        frame = torch.where(self.finished[:, None], self.rule.pad, frame)
        self.hidden[:b].copy_(hidden)
        self.valid[:b, :n].copy_(valid)
        live = ~self.finished
        self.slot.add_(live.long()).clamp_(max=self.max_seq_len - 1)
        self.position.add_(live.long())
        self.finished |= self.rule.is_end_of_audio(frame)
        return frame

    def rows_bucket(self) -> int:
        """The smallest graph bucket holding every row in use (prefilled and not freed), known on the host."""
        used = max((row + 1 for row, s in enumerate(self.next_slot_bound) if s), default=1)
        return min([n for n in GRAPH_BUCKETS if n >= used] + [self.batch_size])

    @torch.inference_mode()
    def capture_graphs(self, backbone: Sampling, depth_decoder: Sampling) -> list[int]:
        """Capture the step of every bucket up to batch_size for rows sampled this way, before any row is
        prefilled (a server's start), so that no request waits for a capture; returns the buckets."""
        if not self.graphed:
            return []
        if any(self.next_slot_bound):
            raise RuntimeError("capture_graphs runs before any row is prefilled")
        self.backbone_sampling.set(slice(None), backbone)
        self.depth_sampling.set(slice(None), depth_decoder)
        buckets = sorted({min(n, self.batch_size) for n in GRAPH_BUCKETS})
        for b in buckets:  # free rows compute pad frames; their writes land at slot 0, which prefill resets
            inputs = (self.hidden[:b], self.slot[:b], self.position[:b], self.valid[:b], self.unit_noise[:b])
            if self.compiled:  # compiled apart, so that the log tells compile from capture
                start = time.perf_counter()
                self._bucket_step(b)(*inputs)
                sync(self.hidden.device)
                self.timings.compile_s += time.perf_counter() - start
            start = time.perf_counter()
            self._graph_for(b)(*inputs)
            sync(self.hidden.device)
            self.timings.capture_s += time.perf_counter() - start
        self.timings.graphs = len(self.graphs)
        return buckets

    def _graph_for(self, b: int) -> CUDAGraphed:
        """The captured step for the first b rows and the current sampling statics."""
        key = (b, self.backbone_sampling.rows(b).key(), self.depth_sampling.rows(b).key())
        if key not in self.graphs:
            self.graphs[key] = CUDAGraphed(
                self._bucket_step(b), name=f"frame step for {b} rows", pool=self.graph_pool
            )
        return self.graphs[key]

    def _bucket_step(self, b: int):
        """The step (eager or compiled) of the first b rows, with the current sampling statics."""
        backbone, depth = self.backbone_sampling.rows(b), self.depth_sampling.rows(b)
        rows = slice(0, b)

        def step(hidden, slot, position, valid, noise):
            with kv_rows(self.model.backbone_model, rows), kv_rows(self.model.depth_decoder.model, rows):
                return self.step(hidden, slot, position, valid, noise, backbone, depth)

        return step

    def free(self, row: int) -> None:
        """End a row: it gives pad frames and takes no part in attention until prefilled again."""
        self.pending.pop(row, None)
        self.prompts[row] = None
        self.finished[row] = True
        self.slot[row] = 0  # it keeps writing (ignored) keys until then: at slot 0, inside any step's view
        self.next_slot_bound[row] = 0

    def release(self) -> None:
        """Free the caches."""
        self.model.backbone_model.remove_caches()
        self.model.depth_decoder.model.remove_caches()


@dataclass
class _Pending:
    """A row's prompt: its embeds while being prefilled, and its content for the prefix store."""

    embeds: torch.Tensor | None
    length: int
    done: int = 0
    last: torch.Tensor | None = None  # the state after position done - 1
    content: torch.Tensor | None = None  # (T, 1 + K) on the CPU
    starts: list[int] | None = None
    root: bytes = b""
    hidden_at: dict = field(default_factory=dict)  # position -> the state after it (segment ends)


class kv_rows:
    """Make every layer's KV cache serve rows `rows` (a slice) of itself for the duration of a block: a
    plain attribute, so a compiled step sees the same modules with another row range (one graph each)."""

    def __init__(self, transformer, rows: slice):
        self.transformer, self.rows, self.saved = transformer, rows, []

    def __enter__(self):
        for layer in self.transformer.layers:
            cache = layer.self_attn.kv_cache
            self.saved.append(cache.rows)
            start, stop, _ = self.rows.indices(cache.k_cache.shape[0])
            cache.rows = (start, stop)

    def __exit__(self, *exc):
        for layer, rows in zip(self.transformer.layers, self.saved):
            layer.self_attn.kv_cache.rows = rows


def use_cuda_graph(device: torch.device, cuda_graph: bool | None) -> bool:
    """Whether a step on `device` replays as a CUDA graph: `cuda_graph`, else CSM_CUDA_GRAPH (1 or 0), else
    CUDA_GRAPH_DEFAULT; never off CUDA or under NO_CUDA_GRAPH=1."""
    if cuda_graph is None:
        env = os.environ.get("CSM_CUDA_GRAPH")
        cuda_graph = CUDA_GRAPH_DEFAULT if env in (None, "") else env == "1"
    return cuda_graph and graphs_enabled(device)


def use_compile(compile: bool | None) -> bool:
    """Whether the frame step is compiled: `compile`, else CSM_COMPILE (1 or 0), else COMPILE_DEFAULT;
    never under NO_TORCH_COMPILE=1."""
    if compile is None:
        env = os.environ.get("CSM_COMPILE")
        compile = COMPILE_DEFAULT if env in (None, "") else env == "1"
    return compile and os.environ.get("NO_TORCH_COMPILE") != "1"


def inductor_cache_dir() -> Path:
    """Where compiled steps are kept between runs: the user's cache folder, csm/inductor."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "csm" / "inductor"


def use_inductor_cache() -> None:
    """Keep inductor's compiled graphs and kernels on disk (TORCHINDUCTOR_CACHE_DIR when set, else
    `inductor_cache_dir()`), so that the next start loads them instead of compiling again."""
    import torch._inductor.config

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    torch._inductor.config.fx_graph_cache = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StartTimings:
    """What getting ready cost: loading the model, compiling the step, capturing its CUDA graphs."""

    load_s: float | None = None
    compile_s: float = 0.0
    capture_s: float = 0.0
    graphs: int = 0

    def summary(self) -> str:
        load = "?" if self.load_s is None else f"{self.load_s:.1f} s"
        return (
            f"load {load}, compile {self.compile_s:.1f} s, capture {self.capture_s:.1f} s "
            f"({self.graphs} CUDA graphs)"
        )
