"""Run under ``torchrun``: every rank reads two epochs of Lhotse training data through the trainer's
:class:`~streamssl.train.data.CutBatches` and rank 0 writes, per data source, what each rank got.

    torchrun --nproc-per-node 2 tests/sharded_ranks.py OUT.json SOURCE...
"""

import json
import sys

import torch
import torch.distributed as dist

from streamssl.data import AudioDataset
from streamssl.train.data import CutBatches, load_cut_split
from streamssl.train.dist import close_world, init_world

EPOCHS = 2
MAX_BATCH_SECONDS = 3.0


def main(out: str, sources: list[str]) -> None:
    torch.set_num_threads(1)
    world = init_world("cpu")
    seen = {}
    for src in sources:
        split = load_cut_split(src, skip_bad=False, what="training data", log=lambda *a: None)
        batches = CutBatches(split, MAX_BATCH_SECONDS, seed=0, world=world, dataset=AudioDataset([]))
        seen[src] = [{"shards": batches.shards(epoch), "batches": [b["ids"] for b in batches.iterate(epoch, 0)]}
                     for epoch in range(EPOCHS)]
    ranks = [None] * world.size
    dist.all_gather_object(ranks, seen)
    if world.is_main:
        with open(out, "w") as f:
            json.dump(ranks, f)
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
