"""Banded multi-head attention: the one attention core that every attention mixer uses.

A query at absolute frame ``t`` may attend to keys at absolute frames ``j`` with
``t + lo <= j <= t + hi`` (``lo=None``: no left limit; ``hi=None``: no right limit). Several key
sources can share one softmax (LLSA's look-ahead stream reads its own past and the causal stream's
future). Two forms compute the same function:

* :func:`dense_band_attention` forms the full ``(Tq, Tk)`` score matrix with a mask. It is MAA's
  baseline form offline and the form every streaming step uses on its small window.
* :func:`blocked_band_attention` cuts the queries into blocks of ``C`` frames; each block scores only
  its key window of ``C + hi - lo`` frames, so memory is ``O(T * (C + L + R))`` and no ``T x T``
  tensor is formed (SA, LLSA).

Masked scores are filled with the dtype's most negative finite value rather than ``-inf``, and masked
probabilities are then zeroed: a query with no visible key (padding) yields zeros, never NaN, in the
forward and the backward pass, and future input has an exactly zero effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class KeySource:
    """Keys and values ``(B, H, Tk, dh)`` whose first frame is at absolute frame ``start``."""

    k: Tensor
    v: Tensor
    lo: int | None
    hi: int | None
    start: int = 0

    def is_empty(self) -> bool:
        return self.lo is not None and self.hi is not None and self.hi < self.lo


def _masked_softmax(scores: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
    widths = [s.shape[-1] for s in scores]
    joined = torch.cat(scores, dim=-1)
    mask = torch.cat([m.expand(*joined.shape[:-1], m.shape[-1]) for m in masks], dim=-1)
    joined = joined.masked_fill(~mask, torch.finfo(joined.dtype).min)
    probs = torch.softmax(joined, dim=-1).masked_fill(~mask, 0.0)
    return list(torch.split(probs, widths, dim=-1))


def dense_band_attention(q: Tensor, sources: list[KeySource], q_start: int = 0,
                         key_lengths: Tensor | None = None) -> Tensor:
    """Attention with an explicit ``(Tq, Tk)`` mask.

    Args:
        q: queries ``(B, H, Tq, dh)`` at absolute frames ``q_start .. q_start + Tq - 1``.
        sources: key/value sources with their bands and absolute start frames.
        key_lengths: ``(B,)`` frames per stream; keys at or past it are padding. ``None``: all valid.
    Returns:
        ``(B, H, Tq, dh)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    t = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + q_start
    scores, masks, values = [], [], []
    for src in sources:
        if src.is_empty():
            continue
        j = torch.arange(src.k.shape[2], device=q.device).unsqueeze(0) + src.start
        rel = j - t
        mask = torch.ones_like(rel, dtype=torch.bool)
        if src.lo is not None:
            mask &= rel >= src.lo
        if src.hi is not None:
            mask &= rel <= src.hi
        mask = mask[None, None]
        if key_lengths is not None:
            mask = mask & (j < key_lengths.view(-1, 1, 1, 1))
        scores.append(torch.matmul(q, src.k.transpose(-1, -2)) * scale)
        masks.append(mask)
        values.append(src.v)
    probs = _masked_softmax(scores, masks)
    return sum(torch.matmul(p, v) for p, v in zip(probs, values))


def _windows(x: Tensor, first: int, n_blocks: int, block: int, width: int) -> Tensor:
    """Windows ``(B, H, n_blocks, width, dh)``: window ``b`` holds frames ``b*block + first + w``.

    Frames outside ``[0, T)`` are zero padding (the caller masks them).
    """
    needed = (n_blocks - 1) * block + width
    if first > 0:
        x, left = x[:, :, first:], 0
    else:
        left = -first
    right = max(needed - left - x.shape[2], 0)
    x = F.pad(x, (0, 0, left, right))[:, :, :needed]
    return x.unfold(2, width, block).transpose(-1, -2)


def blocked_band_attention(q: Tensor, sources: list[KeySource], key_lengths: Tensor, block: int) -> Tensor:
    """Blockwise banded attention over one timeline (all sources and queries start at frame 0).

    Args:
        q: ``(B, H, T, dh)``.
        sources: key/value sources of ``T`` frames each.
        key_lengths: ``(B,)`` valid frames per stream.
        block: query block size ``C``.
    Returns:
        ``(B, H, T, dh)``, equal to :func:`dense_band_attention` to float rounding.
    """
    batch, heads, frames, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    n_blocks = -(-frames // block)
    qb = F.pad(q, (0, 0, 0, n_blocks * block - frames)).view(batch, heads, n_blocks, block, dh)
    i = torch.arange(block, device=q.device).unsqueeze(1)
    starts = (torch.arange(n_blocks, device=q.device) * block).view(n_blocks, 1, 1)
    scores, masks, values = [], [], []
    for src in sources:
        if src.is_empty():
            continue
        lo = -frames if src.lo is None else src.lo
        hi = frames if src.hi is None else src.hi
        width = block + hi - lo
        w = torch.arange(width, device=q.device).unsqueeze(0)
        band = (w - i >= 0) & (w - i <= hi - lo)
        j = starts + lo + w
        valid = (j >= 0) & (j < key_lengths.view(-1, 1, 1, 1))
        scores.append(torch.einsum("bhnqd,bhnwd->bhnqw", qb, _windows(src.k, lo, n_blocks, block, width)) * scale)
        masks.append((band & valid).unsqueeze(1))
        values.append(_windows(src.v, lo, n_blocks, block, width))
    probs = _masked_softmax(scores, masks)
    out = sum(torch.einsum("bhnqw,bhnwd->bhnqd", p, v) for p, v in zip(probs, values))
    return out.reshape(batch, heads, n_blocks * block, dh)[:, :, :frames]
