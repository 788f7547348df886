"""Prefix reuse: the backbone's keys and values for a prompt's leading segments, kept so that the next prompt
that begins the same way prefills only what is new (vLLM's automatic prefix caching, at the turn level).

A prompt is a sequence of positions, each a text token or an audio frame. Its *content* says exactly what
each position holds, (T, 1 + K) integers: the token id, then the frame's K codes (zeros for text). A
position's keys and values depend only on the content up to it (attention is causal and a row has no
padding), so a prefix's cache is a function of its content and nothing else.

Prompts are cut into segments where a turn begins (`bos_token_id`) and before each end-of-audio token
(`audio_eos_token_id`): a context turn is `<bos>[speaker]text<eot>` + one audio token per frame, then its
one-position end. A turn just generated is the prompt's last segment followed by its frames, the same
content as that turn when it comes back as context, so its cache is kept too and the next prompt does not
read it again. (Its end-of-audio position is not: the frame that ended it may differ from the end token's
frame in its last codebook.)

Each segment is one block, keyed by a hash chained over every segment before it (and the model's weights),
holding that segment's keys and values only: prompts that share a voice share its block. Blocks are
evicted least recently used first; a lookup touches a prefix's blocks from its end back to its start, so
the shared leading blocks stay longest. The store is bounded in bytes.

    store = PrefixStore(max_bytes=1 << 30)
    hit = store.lookup(content, cuts, weights)     # longest stored prefix: positions and blocks
    ...                                          # copy hit.blocks into the row's cache, prefill the rest
    store.insert(content, cuts, weights, read_kv, hidden_at)

CSM_PREFIX_CACHE=0 turns the store off everywhere; CSM_PREFIX_CACHE_MB sets the default bound.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from dataclasses import dataclass, field

import torch

DEFAULT_MB = 1024  # about 16,000 positions of csm-1b in fp32, 32,000 in 16 bits


def enabled() -> bool:
    """Whether prompts reuse stored prefixes: not with CSM_PREFIX_CACHE=0."""
    return os.environ.get("CSM_PREFIX_CACHE", "").strip().lower() not in ("0", "false", "no", "off")


def default_bytes() -> int:
    """The store's bound: CSM_PREFIX_CACHE_MB megabytes, else DEFAULT_MB."""
    raw = os.environ.get("CSM_PREFIX_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MB
    except ValueError:
        raise ValueError(f"CSM_PREFIX_CACHE_MB must be a number of megabytes, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"CSM_PREFIX_CACHE_MB must be >= 0, got {raw!r}")
    return int(mb * (1 << 20))


def cuts(content: torch.Tensor, bos_id: int | None, audio_eos_id: int | None) -> list[int]:
    """Where the segments of a prompt's content (T, 1 + K) begin: 0, each turn's first token and each
    end-of-audio token (sorted, unique)."""
    ids = content[:, 0]
    marks = torch.zeros_like(ids, dtype=torch.bool)
    for token in (bos_id, audio_eos_id):
        if token is not None:
            marks |= ids == token
    return sorted({0, *marks.nonzero().flatten().tolist()})


def content_of(config, input_ids: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """What each position of a prompt holds, (B, T, 1 + K) int64 on the CPU: input_ids (B, T) with the audio
    `frames` (N, K) at its audio tokens in row-major order (as the model embeds them) and the end-of-audio
    frame at its end-of-audio tokens; a prompt of codes (B, T, K) is its codes after an id of -1."""
    ids = input_ids.to("cpu", torch.long)
    K = config.num_codebooks
    if ids.dim() == 3:
        return torch.cat([torch.full_like(ids[..., :1], -1), ids], -1)
    content = torch.zeros(*ids.shape, 1 + K, dtype=torch.long)
    content[..., 0] = ids
    if frames is not None and len(frames):
        content[ids == config.audio_token_id, 1:] = frames.to("cpu", torch.long)
    content[ids == config.audio_eos_token_id, 1:] = config.codebook_eos_token_id
    return content


@dataclass
class Block:
    """One segment's keys and values, in pages of the store's pool, and the backbone's state after its last
    position (D,) when known (a block made by a prefill; a generated turn's block has none)."""

    pages: list[int]
    positions: int
    hidden: int | None  # its index in the store's `States`
    parent: bytes | None


class Pages:
    """Keys and values in fixed-size pages (L, 2, KV heads, P positions, D), allocated in slabs as needed up to
    `max_pages` and reused through a free list: a store that evicts and refills never fragments memory."""

    SLAB_BYTES = 64 << 20

    def __init__(self, max_pages: int, like: torch.Tensor, positions: int):
        L, two, KV, _, D = like.shape
        self.shape = (L, two, KV, positions, D)
        self.dtype, self.device, self.P = like.dtype, like.device, positions
        self.page_bytes = L * two * KV * positions * D * like.element_size()
        self.max_pages = max_pages
        self.per_slab = max(1, min(max_pages, self.SLAB_BYTES // self.page_bytes))
        self.slabs: list[torch.Tensor] = []
        self.free: list[int] = []

    def fits(self, kv: torch.Tensor) -> bool:
        return (
            kv.dtype == self.dtype
            and kv.device == self.device
            and kv.shape[:3] + kv.shape[4:] == (self.shape[:3] + self.shape[4:])
        )

    @property
    def allocated(self) -> int:
        return len(self.slabs) * self.per_slab

    def available(self) -> int:
        return len(self.free) + max(0, self.max_pages - self.allocated)

    def take(self, n: int) -> list[int]:
        """n free pages (the caller made sure there are: `available()`)."""
        while len(self.free) < n:
            count = min(self.per_slab, self.max_pages - self.allocated)
            first = self.allocated
            self.slabs.append(torch.empty((self.per_slab, *self.shape), dtype=self.dtype, device=self.device))
            self.free.extend(range(first + count - 1, first - 1, -1))
        return [self.free.pop() for _ in range(n)]

    def give(self, pages: list[int]) -> None:
        self.free.extend(pages)

    def page(self, index: int) -> torch.Tensor:
        return self.slabs[index // self.per_slab][index % self.per_slab]

    def write(self, pages: list[int], kv: torch.Tensor) -> None:
        for i, index in enumerate(pages):
            part = kv[:, :, :, i * self.P : (i + 1) * self.P]
            self.page(index)[:, :, :, : part.shape[3]].copy_(part)

    def pieces(self, block: Block):
        """(page (L, 2, KV, n, D), n) of a block's positions in order."""
        left = block.positions
        for index in block.pages:
            n = min(self.P, left)
            yield self.page(index)[:, :, :, :n], n
            left -= n


@dataclass
class Hit:
    """A lookup's result: the first `positions` of the prompt are stored, as `blocks` in order; `hidden` is
    the state after them when the whole prompt was found (None otherwise)."""

    positions: int = 0
    blocks: list[Block] = field(default_factory=list)
    hidden: torch.Tensor | None = None


def chain(content: torch.Tensor, starts: list[int], end: int, root: bytes) -> list[tuple[int, int, bytes]]:
    """(start, stop, key) of each segment of content[:end], the key hashing the segment and the key before."""
    bounds = [s for s in starts if s < end] + [end]
    data = content[:end].to(torch.int64).contiguous().numpy().tobytes()
    width = content.shape[1] * 8
    out, key = [], root
    for start, stop in zip(bounds, bounds[1:]):
        key = hashlib.blake2b(key + data[start * width : stop * width], digest_size=16).digest()
        out.append((start, stop, key))
    return out


def weights_key(model) -> bytes:
    """What the stored caches were computed with: each weight's storage and in-place version, the dtype and
    device (a weight replaced or changed in place gives another key; old blocks then age out)."""
    parts = [str(model.dtype), str(model.device), str(getattr(model, "training", False))]
    backbone = model.backbone_model
    buffers = [b for name, b in backbone.named_buffers() if "kv_cache" not in name]  # not the caches
    for t in [*backbone.parameters(), *buffers]:
        version = 0 if t.is_inference() else t._version  # inference tensors keep no version
        parts.append(f"{t.data_ptr()}:{version}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).digest()


class States:
    """Backbone states (D,) in slabs of rows reused through a free list, like `Pages`: no tensor per block."""

    SLAB_ROWS = 256

    def __init__(self, like: torch.Tensor):
        self.width, self.dtype, self.device = like.shape[-1], like.dtype, like.device
        self.nbytes = like.numel() * like.element_size()
        self.slabs: list[torch.Tensor] = []
        self.free: list[int] = []

    def put(self, state: torch.Tensor) -> int:
        if not self.free:
            first = len(self.slabs) * self.SLAB_ROWS
            self.slabs.append(torch.empty(self.SLAB_ROWS, self.width, dtype=self.dtype, device=self.device))
            self.free.extend(range(first + self.SLAB_ROWS - 1, first - 1, -1))
        index = self.free.pop()
        self.get(index).copy_(state)
        return index

    def get(self, index: int) -> torch.Tensor:
        return self.slabs[index // self.SLAB_ROWS][index % self.SLAB_ROWS]

    def give(self, index: int | None) -> None:
        if index is not None:
            self.free.append(index)


PAGE_POSITIONS = 16


class PrefixStore:
    """Blocks of backbone keys and values keyed by content, bounded in bytes (pages and states together), least
    recently used out first. Thread-safe; its tensors live on the model's device."""

    def __init__(self, max_bytes: int, page_positions: int = PAGE_POSITIONS):
        self.max_bytes, self.page_positions = int(max_bytes), page_positions
        self.blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()
        self.pool: Pages | None = None  # made at the first block, when the caches' shape is known
        self.states: States | None = None
        self.bytes = 0  # pages in use and states held
        self.hits = self.misses = self.positions_saved = self.positions_prefilled = self.evictions = 0
        self.lock = threading.Lock()

    def lookup(self, content: torch.Tensor, starts: list[int], root: bytes) -> Hit:
        """The longest stored prefix of `content` (T, 1 + K) ending where a segment ends; counts a hit (any
        position found) or a miss."""
        T = content.shape[0]
        hit = Hit()
        with self.lock:
            found = []
            for start, stop, key in chain(content, starts, T, root):
                block = self.blocks.get(key)
                if block is None or block.positions != stop - start:
                    break
                found.append((key, block))
            # A prompt found whole needs the state after its last position, or its last segment runs again.
            if found and len(found) == len(chain_bounds(starts, T)) and found[-1][1].hidden is None:
                found.pop()
            for key, _ in reversed(found):  # the end of the prefix is touched first: its start lives longest
                self.blocks.move_to_end(key)
            hit.blocks = [b for _, b in found]
            hit.positions = sum(b.positions for b in hit.blocks)
            if hit.positions == T:
                hit.hidden = self.states.get(hit.blocks[-1].hidden).clone()
            if hit.positions:
                self.hits += 1
                self.positions_saved += hit.positions
            else:
                self.misses += 1
            self.positions_prefilled += T - hit.positions
        return hit

    def insert(
        self, content: torch.Tensor, starts: list[int], end: int, root: bytes, read_kv, hidden_at=None
    ) -> int:
        """Store the segments of content[:end] not held yet: `read_kv(start, stop)` gives a copy of a segment's
        keys and values (L, 2, KV, n, D), which is kept, `hidden_at(i)` the state after position i (or None).
        Returns the bytes added."""
        added = 0
        parent = None
        for start, stop, key in chain(content, starts, end, root):
            with self.lock:
                known = self.blocks.get(key)
                if known is not None:
                    state = None if known.hidden is not None or hidden_at is None else hidden_at(stop - 1)
                    if state is not None and self.bytes + state.nbytes <= self.max_bytes:
                        known.hidden = self._state(state)
                        self.bytes += state.nbytes
                    parent = key
                    continue
            kv = read_kv(start, stop)  # (L, 2, KV, n, D), a temporary: it goes into pages
            hidden = None if hidden_at is None else hidden_at(stop - 1)
            with self.lock:
                if self.pool is None or not self.pool.fits(kv):
                    self._clear()
                    page = kv.shape[0] * kv.shape[1] * kv.shape[2] * self.page_positions * kv.shape[4]
                    self.pool = Pages(self.max_bytes // (page * kv.element_size()), kv, self.page_positions)
                pool = self.pool
                need = -(-(stop - start) // pool.P)
                size = need * pool.page_bytes + (0 if hidden is None else hidden.nbytes)
                if size > self.max_bytes:
                    break  # nor can any later block be found without this one
                while self.blocks and (pool.available() < need or self.bytes + size > self.max_bytes):
                    self._evict_one()
                pages = pool.take(need)
                pool.write(pages, kv)
                state = None if hidden is None else self._state(hidden)
                self.blocks[key] = Block(pages, stop - start, state, parent)
                self.bytes += size
                added += size
            parent = key
        return added

    def kv(self, block: Block) -> torch.Tensor:
        """A block's keys and values as one tensor (L, 2, KV, n, D) (a copy)."""
        return torch.cat([page for page, _ in self.pool.pieces(block)], 3)

    def pieces(self, block: Block):
        """(keys and values (L, 2, KV, n, D), n) of a block, page by page, in order (views of the pool)."""
        return self.pool.pieces(block)

    def _state(self, state: torch.Tensor) -> int:
        if self.states is None:
            self.states = States(state)
        return self.states.put(state)

    def _nbytes(self, block: Block) -> int:
        return len(block.pages) * self.pool.page_bytes + (0 if block.hidden is None else self.states.nbytes)

    def _evict_one(self) -> None:
        _, block = self.blocks.popitem(last=False)
        self.bytes -= self._nbytes(block)
        self.pool.give(block.pages)
        if self.states is not None:
            self.states.give(block.hidden)
        self.evictions += 1

    def resize(self, max_bytes: int) -> None:
        """A new bound; what was stored is dropped (the pool is sized by the bound)."""
        with self.lock:
            self._clear()
            self.max_bytes = int(max_bytes)

    def _clear(self) -> None:
        self.blocks.clear()
        self.pool = self.states = None
        self.bytes = 0

    def clear(self) -> None:
        with self.lock:
            self._clear()

    def stats(self) -> dict:
        """Counters for /health, the access log and metrics."""
        with self.lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "positions_saved": self.positions_saved,
                "positions_prefilled": self.positions_prefilled,
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "entries": len(self.blocks),
                "evictions": self.evictions,
            }


def chain_bounds(starts: list[int], end: int) -> list[int]:
    return [s for s in starts if s < end]


def store_for(model) -> PrefixStore | None:
    """The model's store (made on first use with the default bound), or None when prefix reuse is off."""
    if not enabled() or getattr(model, "_prefix_off", False):
        return None
    store = getattr(model, "_prefix_store", None)
    if store is None:
        max_bytes = default_bytes()
        if max_bytes <= 0:
            return None
        store = PrefixStore(max_bytes)
        model._prefix_store = store
    return store


def set_store_bytes(model, max_bytes: int) -> PrefixStore | None:
    """Give the model a store of this bound (the server's --prefix-cache-mb); 0 turns reuse off for it."""
    if max_bytes <= 0:
        model._prefix_store = None
        model._prefix_off = True
        return None
    store = getattr(model, "_prefix_store", None)
    if store is None:
        store = model._prefix_store = PrefixStore(max_bytes)
    else:
        store.resize(max_bytes)
    model._prefix_off = False
    return store


def prefix_stats(model) -> dict:
    """The model's store counters (`PrefixStore.stats`), with `enabled`; zeros when it has none."""
    store = store_for(model)
    if store is None:
        return {"enabled": False, **dict.fromkeys(PrefixStore(0).stats(), 0)}
    return {"enabled": True, **store.stats()}
