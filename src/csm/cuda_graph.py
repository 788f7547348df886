"""CUDA graphs without torch.compile: capture a step once, replay it at every call.

A frame is ~300 small kernels (one backbone step, 31 depth-decoder steps, sampling); at batch 1 on a GPU
their launches, not their work, set the pace. A graph replays them with one launch. Capturing costs about
a second, where torch.compile costs tens of seconds to minutes at every new start.

    step = CUDAGraphed(frame_fn)         # frame_fn(*tensors) -> tensor or tuple of tensors
    out = step(hidden, slot, noise)      # first call: warm up, capture, replay; later calls: replay

`NO_CUDA_GRAPH=1` turns every graph off (the function then runs eagerly), for debugging.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

WARMUP_RUNS = 2  # on a side stream before capture, as PyTorch asks (cuBLAS/cuDNN workspaces, lazy tables)


def graphs_enabled(device: torch.device | str) -> bool:
    """Whether steps on `device` run as CUDA graphs: on CUDA, unless NO_CUDA_GRAPH=1."""
    return torch.device(device).type == "cuda" and os.environ.get("NO_CUDA_GRAPH") != "1"


class CUDAGraphed:
    """`func` captured as a CUDA graph on its first call and replayed afterwards.

    `func` takes tensors and returns a tensor or a tuple of tensors. It must be a pure function of its
    inputs and of state it only reads or overwrites in place at places its inputs decide (a KV cache written
    at the inputs' slots): the capture runs it a few times on the first inputs before the real replay.
    Inputs are copied into the graph's own input buffers at every call; a change of shape, dtype or device
    raises instead of replaying a wrong graph. The outputs returned are the graph's
    own buffers: the next call overwrites them, so copy what must outlive it.
    """

    def __init__(
        self,
        func: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
        name: str = "step",
        pool: tuple | None = None,
    ):
        """`pool`: a memory pool (`torch.cuda.graph_pool_handle()`) shared with graphs never replayed at the
        same time, so that one set of intermediates serves them all."""
        self.func, self.name, self.pool = func, name, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
        self.enabled: bool | None = None  # decided at the first call, from the inputs' device

    def __call__(self, *args: torch.Tensor):
        if self.enabled is None:
            self.enabled = bool(args) and graphs_enabled(args[0].device)
        if not self.enabled:
            return self.func(*args)
        if self.graph is None:
            self._capture(args)
        else:
            self._check(args)
            for static, new in zip(self.inputs, args):
                static.copy_(new)
        self.graph.replay()
        return self.outputs

    def _check(self, args: tuple[torch.Tensor, ...]) -> None:
        if len(args) != len(self.inputs):
            raise ValueError(f"{self.name}: captured with {len(self.inputs)} inputs, called with {len(args)}")
        for i, (static, new) in enumerate(zip(self.inputs, args)):
            if (new.shape, new.dtype, new.device) != (static.shape, static.dtype, static.device):
                raise ValueError(
                    f"{self.name}: input {i} is {tuple(new.shape)} {new.dtype} on {new.device}, but the graph "
                    f"was captured for {tuple(static.shape)} {static.dtype} on {static.device}; "
                    "capture another graph for this shape"
                )

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        self.inputs = tuple(a.clone() for a in args)  # the graph's own: a caller's buffer is never written
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.func(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs = self.func(*self.inputs)
        self.graph = graph

    def reset(self) -> None:
        """Drop the captured graph (its memory pool too); the next call captures again."""
        self.graph, self.inputs, self.outputs = None, (), None
