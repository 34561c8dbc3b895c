"""Lhotse data under ``torchrun --nproc-per-node 2`` (gloo, CPU): every rank gets disjoint data, a Shar
folder by shards (each rank reads only its own tars), a cut manifest by Lhotse's sampler; the ranks take
the same number of steps; and pretraining runs on shards end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_ddp import free_port
from train_corpus import make_corpus

pytest.importorskip("lhotse")

from streamssl.cli import main  # noqa: E402
from streamssl.data.lhotse import open_cuts  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARDS = 4


def torchrun(*args: str) -> subprocess.CompletedProcess:
    runner = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([runner, "--nproc-per-node", "2", "--master-port", str(free_port()), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sharded")
    jsonl = make_corpus(root / "tones", n=24)
    cuts, shar = str(root / "cuts.jsonl.gz"), str(root / "shar")
    assert main(["corpus", "manifest", str(jsonl), "--format", "lhotse", "--out", cuts]) == 0
    assert main(["corpus", "shard", cuts, "--out", shar, "--shard-size", str(24 // SHARDS)]) == 0
    return {"lhotse": cuts, "shar": shar}


@pytest.mark.slow
def test_every_rank_gets_its_own_data(sources, tmp_path):
    out = tmp_path / "ranks.json"
    done = torchrun(str(HERE / "sharded_ranks.py"), str(out), sources["lhotse"], sources["shar"])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(out.read_text())
    every_id = {cut.id for cut in open_cuts(sources["lhotse"])}
    shard_ids = [{cut.id for cut in open_cuts(sources["shar"], shards=[i], audio=False)} for i in range(SHARDS)]
    for src in (sources["lhotse"], sources["shar"]):
        for epoch in range(2):
            got = [[i for batch in rank[src][epoch]["batches"] for i in batch] for rank in ranks]
            assert all(got), f"{src}: a rank got nothing in epoch {epoch}"
            assert not set(got[0]) & set(got[1]), f"{src}: ranks share utterances in epoch {epoch}"
            assert all(len(ids) == len(set(ids)) for ids in got) and set(got[0]) | set(got[1]) <= every_id
            assert len(ranks[0][src][epoch]["batches"]) == len(ranks[1][src][epoch]["batches"])
            if src == sources["shar"]:
                shards = [rank[src][epoch]["shards"] for rank in ranks]
                assert sorted(shards[0] + shards[1]) == list(range(SHARDS)) and len(shards[0]) == SHARDS // 2
                for ids, mine in zip(got, shards):
                    assert set(ids) <= set().union(*(shard_ids[i] for i in mine))
    # A new epoch deals the shards out anew.
    assert ranks[0][sources["shar"]][0]["shards"] != ranks[0][sources["shar"]][1]["shards"]


@pytest.mark.slow
def test_torchrun_pretrains_on_shards(sources, tmp_path):
    done = torchrun("-m", "streamssl", "pretrain", "--preset", "tiny", "--train", sources["shar"], "--out",
                    str(tmp_path / "run"), "--steps", "2", "--set", "max_batch_seconds=2", "--no-progress",
                    "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pretrain run") == 1 and "24 training utterances" in done.stdout
