"""The process group a run trains in: one process, or ``torchrun`` with DDP (NCCL on GPUs, gloo on CPU).

Losses are normalised by *global* counts (summed over ranks before backward), so that DDP's gradient
average over ranks gives exactly the gradient of the single-process loss on the union of the ranks'
batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class World:
    """This process's place in the run. ``size == 1`` means no process group."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, x: Tensor) -> Tensor:
        """Sum over ranks, no gradient (counts, logged values)."""
        x = x.detach().clone()
        if self.distributed:
            dist.all_reduce(x)
        return x

    def min_int(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def differentiable_sum(self, x: Tensor) -> Tensor:
        """Sum over ranks whose backward sums the incoming gradients over ranks too."""
        return _AllReduceSum.apply(x) if self.distributed else x

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when present, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_world(device: str | None = None) -> World:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1``; otherwise a one-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(0, 1, pick_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    chosen = pick_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return World(rank, size, chosen)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
