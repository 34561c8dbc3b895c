"""Two CPU processes with DDP (gloo) train exactly like one process on the same global batches."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_corpus import make_corpus

from streamssl.train.api import build_config

SETTINGS = [("max_batch_seconds", 100.0), ("encoder.dropout", 0.0), ("lr", 3e-3), ("warmup_steps", 1)]
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_batches(kind: str, corpus: str, run_dir: str, rank: int, world_size: int, out: str) -> None:
    """Run STEPS optimiser steps; global batch k is utterances [4k, 4k+4), split evenly over ranks."""
    from streamssl.data import AudioDataset, collate, load_utterances
    from streamssl.train.dist import close_world, init_world
    from streamssl.train.tasks import FinetuneTask, PretrainTask
    from streamssl.train.trainer import Trainer, seed_everything

    torch.set_num_threads(1)
    world = init_world("cpu")
    config = build_config(kind, "tiny", None, SETTINGS, train_data=corpus, steps=STEPS)
    utterances = load_utterances(corpus)
    seed_everything(config.seed, world.rank)
    task = PretrainTask(config) if kind == "pretrain" else FinetuneTask(config, log=lambda *a: None)
    trainer = Trainer(task, run_dir, world, utterances, progress=False)
    dataset = AudioDataset(utterances)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    per_rank = 4 // world_size
    for step in range(STEPS):
        indices = range(4 * step + rank * per_rank, 4 * step + (rank + 1) * per_rank)
        trainer._train_step(collate([dataset[i] for i in indices]))
        trainer.step += 1
    state = {"ranks": [{k: v.detach().clone() for k, v in trainer.model.state_dict().items()}]}
    if world.distributed:
        gathered = [None] * world.size
        torch.distributed.all_gather_object(gathered, state["ranks"][0])
        state = {"ranks": gathered}
    if rank == 0:
        torch.save({"initial": initial, **state}, out)
    close_world(world)


def _worker(rank: int, kind: str, corpus: str, run_dir: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    train_on_batches(kind, corpus, run_dir, rank, 2, out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=4 * STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_two_processes_equal_one_process_with_the_same_global_batch(kind, corpus, tmp_path):
    single = tmp_path / "single.pt"
    train_on_batches(kind, corpus, str(tmp_path / "run1"), 0, 1, str(single))
    double = tmp_path / "double.pt"
    mp.start_processes(_worker, args=(kind, corpus, str(tmp_path / "run2"), free_port(), str(double)),
                       nprocs=2, start_method="spawn")
    one = torch.load(single)
    two = torch.load(double)
    ranks = two["ranks"]
    for name, value in one["ranks"][0].items():
        assert torch.equal(two["initial"][name], one["initial"][name]), f"{name}: different initialisation"
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks out of sync at {name}"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=f"{name} differs from 1 process")
    moved = [k for k, v in one["ranks"][0].items() if not torch.equal(v, one["initial"][k])]
    assert len(moved) > 0.8 * len(one["initial"])  # the steps really trained the model


@pytest.mark.slow
def test_torchrun_pretrain_cli(corpus, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    command = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "streamssl",
               "pretrain", "--preset", "tiny", "--train", corpus, "--out", str(tmp_path / "run"), "--steps", "2",
               "--set", "max_batch_seconds=2", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pretrain run") == 1  # only rank 0 speaks
    from streamssl.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "run", kind="pretrain")
    assert checkpoint.step == 2 and len(checkpoint.payload["rng"]) == 2
