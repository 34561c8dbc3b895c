"""A run is bit-identical given its configuration (seed included) and the torch thread count: two runs of
the same command, each in a process of its own, give the same losses and the same weights."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from train_corpus import make_corpus

from streamssl.train.checkpoint import load_checkpoint

# More than one thread, so that kernels split their work between threads. The distractor gather of the
# wav2vec 2.0 loss is large enough here (50 distractors of 64 dimensions) to be split: without deterministic
# kernels its backward sums in the order the threads finish, and the two runs differ in the last bits.
THREADS = "2"
RUNS = {
    "pretrain": ["--preset", "tiny", "--steps", "6", "--set", "objective_options.num_negatives=50",
                 "--set", "objective_options.final_dim=64",
                 "--set", "augment={speed_factors: [0.9, 1.0, 1.1], noise_snr_db: [5, 20], noise_prob: 0.7}"],
    "finetune": ["--preset", "tiny", "--steps", "4", "--set", "num_workers=2",
                 "--set", "augment={speed_factors: [0.9, 1.1], spec_freq_masks: 2, spec_freq_width: 4, "
                          "spec_time_masks: 2, spec_time_width: 5}"],
}
COMMON = ["--set", "max_batch_seconds=2.5", "--set", "log_every=1", "--seed", "3", "--no-progress",
          "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=8))


def train(kind: str, corpus: str, out, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "streamssl", kind, *RUNS[kind], *COMMON, "--train", corpus,
               "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{THREADS} thread(s) each" in result.stdout


def losses(run) -> list[dict[str, str]]:
    """Every logged training row but its wall time."""
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(open(run / "train.csv"))]


def assert_same_run(a, b, kind: str, steps: int) -> None:
    rows = losses(a)
    assert len(rows) == steps and rows == losses(b)
    first, second = load_checkpoint(a, kind=kind), load_checkpoint(b, kind=kind)
    assert first.step == second.step == steps
    weights = second.model.state_dict()
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.slow
def test_two_runs_of_one_configuration_are_bit_identical(corpus, tmp_path):
    for name in ("a", "b"):
        train("pretrain", corpus, tmp_path / f"pt-{name}")
    assert_same_run(tmp_path / "pt-a", tmp_path / "pt-b", "pretrain", 6)
    for name in ("a", "b"):
        train("finetune", corpus, tmp_path / f"ft-{name}", "--init", str(tmp_path / "pt-a"))
    assert_same_run(tmp_path / "ft-a", tmp_path / "ft-b", "finetune", 4)
    # The runs really trained: the loss moved and the fine-tuned encoder left its initialisation.
    assert losses(tmp_path / "pt-a")[0] != losses(tmp_path / "pt-a")[-1]
    pretrained = load_checkpoint(tmp_path / "pt-a").model.encoder.state_dict()
    tuned = load_checkpoint(tmp_path / "ft-a").model.encoder.state_dict()
    assert any(not torch.equal(value, tuned[name]) for name, value in pretrained.items())
