"""Streaming window bookkeeping, shared by every mixer family, the encoder and its frontend.

Every streaming cache is a fixed number ``W`` of the most recent frames of each stream, newest last
(right-aligned). A step brings ``n`` new frame slots per stream, of which the last ``count[b]`` are
real frames (right-aligned too; the others are filler). :func:`push` joins cache and new frames into
one window of ``W + n`` slots holding, per stream, the latest ``W + n`` frame slots it knows, so the
slot of a given position never depends on how many frames the other streams of the batch brought.
Slot ``i`` of that window is at absolute position ``end - (W + n) + i``, where ``end[b]`` counts the
frames stream ``b`` has pushed, this step included. The new cache is the window's last ``W`` slots.

Nothing here reads a tensor value into Python: positions, counts and validity are tensors, and every
shape depends only on ``W`` and ``n``. That is what lets streams at different positions share a batch,
and a step be exported at a fixed chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import register_dataclass


def tracing() -> bool:
    """Whether a graph is being traced: it cannot branch on values."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def size(x: Tensor, dim: int) -> int:
    """``x.shape[dim]`` as a plain int, also while tracing. A step is exported at one chunk size, so every
    size but the batch is fixed; a traced size would put shape arithmetic (``Shape``, ``Gather``,
    ``Concat``...) into the graph at each use, which outnumbered the step's real operators."""
    return int(x.shape[dim])


def batch_dim(x: Tensor) -> int:
    """The batch size to reshape ``x`` with: ``-1`` (inferred, which keeps a traced batch symbolic without
    shape arithmetic), or its actual size where ``x`` has no elements and ``-1`` would be ambiguous."""
    if any(size(x, d) == 0 for d in range(1, x.dim())):
        return int(x.shape[0])
    return -1


@dataclass
class Chunk:
    """Per-stream bookkeeping of one stack step, all ``(B,)`` int64.

    count: real frames among the ``n`` new slots (right-aligned).
    end: frames pushed so far at the stack input, this step included (flush padding counts).
    valid_end: frames that exist at the stack input; keys at or past it are masked. It equals ``end``
        except while flushing, when padding frames drive the look-ahead out.

    A chunk also keeps what its step's layers share (:meth:`push` indices, :meth:`memo`), so that a
    step computes them once instead of once per layer; :meth:`lagged` copies share it.
    """

    count: Tensor
    end: Tensor
    valid_end: Tensor
    lag: int = 0
    shared: dict = field(default_factory=dict, repr=False, compare=False)

    def lagged(self, frames: int) -> "Chunk":
        """The same chunk seen ``frames`` later in the pipeline (a layer with that much look-ahead)."""
        return Chunk(self.count, self.end - frames, self.valid_end, self.lag + frames, self.shared)

    def memo(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """``make()``, computed once per step and lag for ``key``, which must name everything else it
        depends on (shapes, options, dtype)."""
        key = (self.lag, *key)
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def push(self, cache: Tensor, new: Tensor, dim: int = 1) -> Tensor:
        """:func:`push` with ``count``, its row index made once per step for each window shape."""
        if size(cache, dim) == 0:
            return new
        joined = torch.cat([cache, new], dim)
        n = size(new, dim)
        if n == 0:
            return joined
        lead = tuple(size(joined, d) for d in range(1, dim + 1))
        key = ("push", n, lead)
        if key not in self.shared:  # the same for every lag: it depends only on the counts
            self.shared[key] = None if self._all_real(n) else _push_rows(self.count, n, lead)
        index = self.shared[key]
        return joined if index is None else _select_rows(joined, index, dim)

    def _all_real(self, n: int) -> bool:
        """Whether every stream brought ``n`` real frames, so that :meth:`push` is the concatenation itself:
        the usual case, checked once per step in eager mode (a traced step keeps the general form)."""
        key = ("all_real", n)
        if key not in self.shared:
            self.shared[key] = not tracing() and bool((self.count == n).all())
        return self.shared[key]


def _push_rows(count: Tensor, n: int, lead: tuple[int, ...]) -> Tensor:
    """Row index of :func:`push` into a joined window ``(B, *lead, ...)`` flattened to rows at its time
    dimension (the last of ``lead``): ``(B * prod(lead),)``."""
    width = lead[-1]
    i = torch.arange(width, device=count.device)
    count = count.view(-1, 1)
    slot = torch.where(i < width - count, (i - (n - count)).clamp(min=0), i)       # (B, width)
    groups = 1
    for extent in lead[:-1]:
        groups *= extent
    base = torch.arange(groups, device=count.device).view(1, groups, 1) * width
    batch = torch.arange(count.shape[0], device=count.device).view(-1, 1, 1) * (groups * width)
    return (batch + base + slot.unsqueeze(1)).flatten()


def _select_rows(joined: Tensor, index: Tensor, dim: int) -> Tensor:
    """``joined`` with its slots along ``dim`` reordered by a :func:`_push_rows` index: one row copy
    per slot (``index_select``), cheaper than an element-wise ``gather``."""
    shape = [size(joined, d) for d in range(1, joined.dim())]
    trailing = 1
    for frames in shape[dim:]:
        trailing *= frames
    return joined.reshape(-1, trailing).index_select(0, index).view(-1, *shape)


def push(cache: Tensor, new: Tensor, count: Tensor, dim: int = 1) -> Tensor:
    """Window of ``W + n`` slots: ``cache`` (``W`` slots along ``dim``) then the real frames of ``new``.

    Args:
        cache: ``(B, ..., W, ...)``, slot ``j`` at position ``end_before - W + j``.
        new: ``(B, ..., n, ...)``; its last ``count[b]`` slots are stream ``b``'s new frames.
        count: ``(B,)`` int64, ``0 <= count <= n``.
    Returns:
        ``(B, ..., W + n, ...)``; slot ``i`` at position ``end_before + count - (W + n) + i``. Slots
        older than the cache (``i < n - count``) repeat an arbitrary frame: callers mask them through
        :func:`fresh` or never read them.
    """
    if size(cache, dim) == 0:
        return new
    joined = torch.cat([cache, new], dim)
    n = size(new, dim)
    if n == 0:
        return joined
    return _select_rows(joined, _push_rows(count, n, tuple(size(joined, d) for d in range(1, dim + 1))), dim)


def key_mask(chunk: Chunk, windows: tuple[tuple[int, int], ...], n: int) -> Tensor:
    """``(B, sum of widths)``: the slots of :func:`push` windows, side by side, that hold frames which exist
    (position in ``[0, valid_end)``, not older than the cache). Window ``(width, lag)`` holds ``width`` slots
    whose newest is at ``chunk.end - lag - 1``; ``n``: the new slots each window got this step.

    A slot at offset ``o`` from ``end`` (position ``end - o``) exists if ``o <= end`` and
    ``o > end - valid_end``; the offsets and slot numbers are constants, so a step compares three
    per-stream numbers with them instead of building positions per window."""
    offsets, slots = _window_slots(windows, chunk.end.device)
    end = chunk.end.view(-1, 1)
    exists = (offsets <= end) & (offsets > (chunk.end - chunk.valid_end).view(-1, 1))
    return exists & (slots >= (n - chunk.count).view(-1, 1))


@lru_cache(maxsize=None)
def _window_slots(windows: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The offsets from ``end`` and the slot numbers within their window of :func:`key_mask`'s slots."""
    offsets = np.array([lag + width - i for width, lag in windows for i in range(width)], dtype=np.int64)
    slots = np.array([i for width, _ in windows for i in range(width)], dtype=np.int64)
    return torch.from_numpy(offsets).to(device), torch.from_numpy(slots).to(device)


def take(window: Tensor, start: Tensor, width: int, dim: int = 1) -> Tensor:
    """``width`` slots of ``window`` along ``dim`` from per-stream slot ``start`` ``(B,)`` (clamped)."""
    return torch.gather(window, dim, take_index(window, start, width, dim))


def take_index(window: Tensor, start: Tensor, width: int, dim: int = 1) -> Tensor:
    """The ``torch.gather`` index of :func:`take`: one index serves every tensor shaped like ``window``."""
    index = (start.view(-1, 1) + torch.arange(width, device=window.device)).clamp(0, size(window, dim) - 1)
    for d in range(1, window.dim()):
        if d != dim:
            index = index.unsqueeze(d)
    target = [-1] + [size(window, d) for d in range(1, window.dim())]
    target[dim] = width
    return index.expand(target)


def keep_last(window: Tensor, frames: int | None, dim: int = 1) -> Tensor:
    """The next cache: the window's last ``frames`` slots (``None``: all of it, an unbounded cache)."""
    if frames is None:
        return window
    return window.narrow(dim, size(window, dim) - frames, frames)


def output_mask(chunk: Chunk, n: int) -> Tensor:
    """``(B, n)``: which of the ``n`` output slots of a fixed-lag layer hold newly final frames.

    ``chunk`` is already lagged to the layer's output: slot ``o`` is at position ``end - n + o``.
    """
    return key_mask(chunk, ((n, 0),), n)


def streaming_state(cls: type) -> type:
    """Make ``cls`` a dataclass whose fields are pytree children (tensors, lists of states, ``None``)."""
    cls = dataclass(cls)
    register_dataclass(cls)
    return cls
