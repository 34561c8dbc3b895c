"""Span masks over frames, drawn from per-utterance seeds (self-supervised objectives, CTC time masking).

Every random choice is drawn from a generator seeded by :func:`utterance_seed` (run seed, step,
utterance id), so a mask does not depend on which process or batch position an utterance lands in:
a DDP run and a single-process run see the same masks.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def utterance_seed(seed: int, step: int, utterance_id: str) -> int:
    """A 63-bit seed for one utterance at one step, stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}/{step}/{utterance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def span_mask(frame_lengths: Tensor, seeds: list[int], prob: float, span: int, total: int) -> Tensor:
    """Boolean ``(B, total)`` mask: about ``prob * T / span`` spans of ``span`` frames start at random
    valid frames of each utterance (spans may overlap; at least one span). Padding is never masked.

    Args:
        frame_lengths: ``(B,)`` valid frames per utterance.
        seeds: one generator seed per utterance.
    """
    mask = torch.zeros(len(seeds), total, dtype=torch.bool)
    for b, (length, seed) in enumerate(zip(frame_lengths.tolist(), seeds)):
        g = torch.Generator().manual_seed(seed)
        width = min(span, length)
        n_spans = int(prob * length / width + torch.rand((), generator=g))  # random rounding
        n_spans = min(max(n_spans, 1), length - width + 1)
        for start in torch.randperm(length - width + 1, generator=g)[:n_spans].tolist():
            mask[b, start:start + width] = True
    return mask.to(frame_lengths.device)
