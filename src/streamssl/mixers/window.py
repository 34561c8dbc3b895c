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

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._pytree import register_dataclass


@dataclass
class Chunk:
    """Per-stream bookkeeping of one stack step, all ``(B,)`` int64.

    count: real frames among the ``n`` new slots (right-aligned).
    end: frames pushed so far at the stack input, this step included (flush padding counts).
    valid_end: frames that exist at the stack input; keys at or past it are masked. It equals ``end``
        except while flushing, when padding frames drive the look-ahead out.
    """

    count: Tensor
    end: Tensor
    valid_end: Tensor

    def lagged(self, frames: int) -> "Chunk":
        """The same chunk seen ``frames`` later in the pipeline (a layer with that much look-ahead)."""
        return Chunk(self.count, self.end - frames, self.valid_end)


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
    if cache.shape[dim] == 0:
        return new
    joined = torch.cat([cache, new], dim)
    width, n = joined.shape[dim], new.shape[dim]
    if n == 0:
        return joined
    i = torch.arange(width, device=joined.device)
    count = count.view(-1, 1)
    from_cache = i < width - count
    index = torch.where(from_cache, (i - (n - count)).clamp(min=0), i)
    shape = [1] * joined.dim()
    shape[0], shape[dim] = index.shape[0], width
    return torch.gather(joined, dim, index.view(shape).expand(joined.shape))


def positions(end: Tensor, width: int) -> Tensor:
    """``(B, width)`` absolute positions of a right-aligned window whose newest slot is ``end - 1``."""
    return end.view(-1, 1) - width + torch.arange(width, device=end.device)


def fresh(width: int, n: int, count: Tensor) -> Tensor:
    """``(B, width)``: False for the slots of a :func:`push` window older than its cache."""
    return torch.arange(width, device=count.device) >= (n - count).view(-1, 1)


def key_mask(end: Tensor, width: int, n: int, chunk: Chunk) -> Tensor:
    """``(B, width)``: the window slots that hold frames which exist (position in ``[0, valid_end)``)."""
    pos = positions(end, width)
    return (pos >= 0) & (pos < chunk.valid_end.view(-1, 1)) & fresh(width, n, chunk.count)


def take(window: Tensor, start: Tensor, width: int, dim: int = 1) -> Tensor:
    """``width`` slots of ``window`` along ``dim`` from per-stream slot ``start`` ``(B,)`` (clamped)."""
    return torch.gather(window, dim, take_index(window, start, width, dim))


def take_index(window: Tensor, start: Tensor, width: int, dim: int = 1) -> Tensor:
    """The ``torch.gather`` index of :func:`take`: one index serves every tensor shaped like ``window``."""
    index = (start.view(-1, 1) + torch.arange(width, device=window.device)).clamp(0, window.shape[dim] - 1)
    shape = [1] * window.dim()
    shape[0], shape[dim] = index.shape[0], width
    target = list(window.shape)
    target[dim] = width
    return index.view(shape).expand(target)


def keep_last(window: Tensor, frames: int | None, dim: int = 1) -> Tensor:
    """The next cache: the window's last ``frames`` slots (``None``: all of it, an unbounded cache)."""
    if frames is None:
        return window
    return window.narrow(dim, window.shape[dim] - frames, frames)


def output_mask(chunk: Chunk, n: int) -> Tensor:
    """``(B, n)``: which of the ``n`` output slots of a fixed-lag layer hold newly final frames.

    ``chunk`` is already lagged to the layer's output: slot ``o`` is at position ``end - n + o``.
    """
    return key_mask(chunk.end, n, n, chunk)


def streaming_state(cls: type) -> type:
    """Make ``cls`` a dataclass whose fields are pytree children (tensors, lists of states, ``None``)."""
    cls = dataclass(cls)
    register_dataclass(cls)
    return cls
