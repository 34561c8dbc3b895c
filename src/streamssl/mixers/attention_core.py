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

Masked keys get exactly zero weight, so padding and the future have no effect at all, not merely a
small one. The dense form fills masked scores with the dtype's most negative finite value rather than
``-inf``: a query that sees no key (only a padded query can) averages all keys instead of producing
NaN, and its output is padding anyway. The blocked form uses PyTorch's fused attention, whose ``-inf``
masking would give NaN for such a row, so there a padded query may see its own key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def visible_bias(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive attention bias of a mask: 0 where ``visible``, the dtype's most negative finite value
    elsewhere (as the dense form, so a row that sees no key averages instead of giving NaN). One ``where``
    on two cached scalars: an exported step gets one node, not the shape arithmetic of a filled tensor."""
    zero, lowest = _bias_values(dtype, visible.device)
    return torch.where(visible, zero, lowest)


@lru_cache(maxsize=None)
def _bias_values(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    # from numpy, so that a step being traced records constants
    return tuple(torch.from_numpy(np.array(value)).to(device, dtype) for value in (0.0, torch.finfo(dtype).min))


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(dh) + bias) v`` as one fused call: the streaming steps' attention, whose
    masks are made once per step (:func:`visible_bias`) and shared by the layers.

    Args:
        q: ``(B, H, Tq, dh)``; k, v: ``(B, H, Tk, dh)``; bias: broadcastable to ``(B, H, Tq, Tk)``.
    Returns:
        ``(B, H, Tq, dh)``.
    """
    # The scale as a constant: left to the call, an exported graph computes it from q's shape every time.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(int(q.shape[-1])))


@dataclass
class KeySource:
    """Keys and values ``(B, H, Tk, dh)`` whose first frame is at absolute frame ``start``.

    ``valid`` ``(B, Tk)`` (dense form only): False hides a key from every query of its stream, on top
    of the band; streaming windows mark with it the slots that hold no frame of their stream.
    """

    k: Tensor
    v: Tensor
    lo: int | None
    hi: int | None
    start: int = 0
    valid: Tensor | None = None

    def is_empty(self) -> bool:
        return self.lo is not None and self.hi is not None and self.hi < self.lo


def dense_band_attention(q: Tensor, sources: list[KeySource], q_start: int = 0,
                         key_lengths: Tensor | None = None) -> Tensor:
    """Attention with an explicit ``(Tq, Tk)`` mask per source.

    Args:
        q: queries ``(B, H, Tq, dh)`` at absolute frames ``q_start .. q_start + Tq - 1``.
        sources: key/value sources with their bands and absolute start frames.
        key_lengths: ``(B,)`` frames per stream; keys at or past it are padding. ``None``: all valid.
    Returns:
        ``(B, H, Tq, dh)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    t = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + q_start
    scores, hidden, values = [], [], []
    for src in sources:
        if src.is_empty():
            continue
        j = torch.arange(src.k.shape[2], device=q.device).unsqueeze(0) + src.start
        rel = j - t
        hide = torch.zeros_like(rel, dtype=torch.bool)
        if src.lo is not None:
            hide = hide | (rel < src.lo)
        if src.hi is not None:
            hide = hide | (rel > src.hi)
        hide = hide[None, None]
        if key_lengths is not None:
            hide = hide | (j >= key_lengths.view(-1, 1, 1, 1))
        if src.valid is not None:
            hide = hide | ~src.valid[:, None, None, :]
        scores.append(torch.matmul(q, src.k.transpose(-1, -2)) * scale)
        hidden.append(hide)
        values.append(src.v)
    if len(scores) == 1:
        joined, hide = scores[0], hidden[0]
    else:
        joined = torch.cat(scores, dim=-1)
        hide = torch.cat([h.expand(*joined.shape[:-1], h.shape[-1]) for h in hidden], dim=-1)
    probs = torch.softmax(joined.masked_fill(hide, torch.finfo(joined.dtype).min), dim=-1)
    widths = [s.shape[-1] for s in scores]
    return sum(torch.matmul(p, v) for p, v in zip(torch.split(probs, widths, dim=-1), values))


def _windows(x: Tensor, first: int, n_blocks: int, block: int, width: int) -> Tensor:
    """Windows ``(B, n_blocks, H, width, dh)`` (a view): window ``b`` holds frames ``b*block + first + w``.

    Frames outside ``[0, T)`` are zero padding (the caller masks them).
    """
    needed = (n_blocks - 1) * block + width
    if first > 0:
        x, left = x[:, :, first:], 0
    else:
        left = -first
    right = max(needed - left - x.shape[2], 0)
    x = F.pad(x, (0, 0, left, right))[:, :, :needed]
    return x.unfold(2, width, block).permute(0, 2, 1, 4, 3)


def blocked_band_attention(q: Tensor, sources: list[KeySource], key_lengths: Tensor, block: int) -> Tensor:
    """Blockwise banded attention over one timeline (all sources and queries start at frame 0).

    Each block of ``C`` queries gets its own key window, and the blocks run as a batch through
    PyTorch's fused attention, which keeps no score or probability tensor for the backward pass.
    A padded query (at or past its stream's length) may see its own key, so no row is fully masked;
    valid queries are unaffected because their own key is valid anyway.

    Args:
        q: ``(B, H, T, dh)``.
        sources: key/value sources of ``T`` frames each; at least one band must contain offset 0.
        key_lengths: ``(B,)`` valid frames per stream.
        block: query block size ``C``.
    Returns:
        ``(B, H, T, dh)``, equal to :func:`dense_band_attention` on valid frames, to float rounding.
    """
    batch, heads, frames, dh = q.shape
    n_blocks = -(-frames // block)

    qb = F.pad(q, (0, 0, 0, n_blocks * block - frames)).view(batch, heads, n_blocks, block, dh)
    qb = qb.transpose(1, 2).reshape(batch * n_blocks, heads, block, dh)
    i = torch.arange(block, device=q.device).unsqueeze(1)
    starts = (torch.arange(n_blocks, device=q.device) * block).view(n_blocks, 1, 1)
    keys, values, masks = [], [], []
    for src in sources:
        if src.is_empty():
            continue
        lo = -frames if src.lo is None else src.lo
        hi = frames if src.hi is None else src.hi
        width = block + hi - lo
        rel = lo + torch.arange(width, device=q.device).unsqueeze(0) - i
        j = starts + i + rel
        valid = (j >= 0) & (j < key_lengths.view(-1, 1, 1, 1))
        masks.append((rel >= lo) & (rel <= hi) & (valid | (rel == 0)))
        keys.append(_windows(src.k, lo, n_blocks, block, width))
        values.append(_windows(src.v, lo, n_blocks, block, width))
    mask = torch.cat(masks, dim=-1).reshape(batch * n_blocks, 1, block, -1)
    # One copy per tensor: the concatenation lays the windows out contiguously, blocks first.
    k = torch.cat(keys, dim=3).view(batch * n_blocks, heads, -1, dh)
    v = torch.cat(values, dim=3).view(batch * n_blocks, heads, -1, dh)
    out = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask)
    out = out.view(batch, n_blocks, heads, block, dh).transpose(1, 2)
    return out.reshape(batch, heads, n_blocks * block, dh)[:, :, :frames]
