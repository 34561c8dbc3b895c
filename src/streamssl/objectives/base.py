"""What every self-supervised objective shares: the cross-process reducer it normalises by, and the
code-use statistic of its targets."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Reducer(Protocol):
    """Sums over the processes of a run (``streamssl.train.dist.World`` is one)."""

    size: int

    def sum(self, x: Tensor) -> Tensor:
        """Sum over processes, no gradient."""

    def differentiable_sum(self, x: Tensor) -> Tensor:
        """Sum over processes whose backward sums the gradients over processes too."""


class OneProcess:
    """The :class:`Reducer` of a run in a single process: every sum is the local value."""

    size = 1

    def sum(self, x: Tensor) -> Tensor:
        return x.detach().clone()

    def differentiable_sum(self, x: Tensor) -> Tensor:
        return x


def code_perplexity(counts: Tensor) -> Tensor:
    """Hard code perplexity ``exp(entropy)`` of code counts ``(groups, entries)``, averaged over groups:
    the number of equally used codes that would give the same entropy (1 = collapsed, ``entries`` = uniform).
    """
    p = counts.double() / counts.double().sum(-1, keepdim=True).clamp(min=1)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
    return torch.exp(entropy).mean().float()
