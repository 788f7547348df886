"""Streaming: one mechanism shared by every layer that looks back in time.

A layer that needs history (causal conv, transposed conv, transformer) subclasses `StreamingModule` and
says how to build its state. The state of one stream through a model lives in a `StreamState`, outside
the modules, so any number of streams can run side by side over the same weights. Each state has a fixed
size allocated once, so the cost of a step does not grow with the length of the stream.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn


class StreamingModule(nn.Module):
    """A layer that can run chunk by chunk: `forward(x, stream)` reads and updates `stream[self]`."""

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError


class StreamState:
    """The state of one stream through some modules: one entry per `StreamingModule` inside them."""

    def __init__(
        self, modules: list[nn.Module], batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.batch_size = batch_size
        # Set while flushing the end of a stream: strided convolutions then pad their last partial
        # window, as the full (non-streaming) pass does at the end of a clip.
        self.final = False
        # Set during a step of some rows only (MimiStreamingDecoder.step(codes, rows)): each state is then
        # read and written at those rows, so streams at different points can share one state; and its writes
        # wait in `writes` until the whole step has run, so a step that raises leaves every row as it was.
        self.rows: torch.Tensor | None = None
        self.writes: list[Callable[[], object]] | None = None
        self._states: dict[nn.Module, Any] = {}
        for root in modules:
            for m in root.modules():
                if isinstance(m, StreamingModule):
                    self._states[m] = m.init_state(batch_size, device, dtype)

    def __getitem__(self, module: nn.Module) -> Any:
        return self._states[module]

    def __setitem__(self, module: nn.Module, state: Any) -> None:
        self._states[module] = state

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of a state tensor (B, ...) this step runs."""
        return t if self.rows is None else t[self.rows]

    def keep(self, t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Store `new`, the updated rows of the state tensor `t`; returns the state tensor to keep."""
        if self.rows is None:
            return new.contiguous()
        if new.shape[1:] != t.shape[1:]:
            raise ValueError(
                f"a state of shape {tuple(t.shape)} cannot take rows of shape {tuple(new.shape)}"
            )
        self.later(partial(t.index_copy_, 0, self.rows, new))
        return t

    def later(self, write: Callable[[], object]) -> None:
        """Run a state write now, or once the row-wise step has run whole."""
        if self.writes is None:
            write()
        else:
            self.writes.append(write)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Start new streams in `rows`, the others going on."""
        for state in self._states.values():
            state.reset_rows(rows)
