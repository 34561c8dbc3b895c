"""What every self-supervised objective shares: how it reads its options, the cross-process reducer it
normalises by, and the code-use statistic of its targets."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn


class Objective(nn.Module):
    """Base of the entries of :data:`streamssl.objectives.OBJECTIVES`.

    ``name``: the registry name; ``Options``: the dataclass of the objective's options, every field with a
    default, checked by its ``__post_init__``.
    """

    name: ClassVar[str]
    Options: ClassVar[type]

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """``Options`` from ``PretrainConfig.objective_options``; a key the objective does not read is a
        ``ValueError`` naming it, so no setting is ever silently unused."""
        known = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"objective {cls.name!r} does not read option(s) {unknown}; its options: {sorted(known)}")
        return cls.Options(**options)


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
