"""Runs are real: a checkpoint rebuilds its model, and a stopped run resumes to identical weights."""

import csv

import pytest
import torch
from train_corpus import make_corpus

from streamssl.train.api import build_config, run_training
from streamssl.train.checkpoint import load_checkpoint

SETTINGS = {
    "pretrain": [("encoder.dropout", 0.1), ("max_batch_seconds", 2.5), ("save_every", 100), ("log_every", 1)],
    "finetune": [("encoder.dropout", 0.1), ("max_batch_seconds", 2.5), ("save_every", 100), ("log_every", 1),
                 ("head", "lstm"), ("lstm_hidden", 16), ("mask_prob", 0.2)],
}


# Every augmentation on: speed perturbation and noise (both tasks), SpecAugment (fine-tuning only).
AUGMENT = {
    "pretrain": {"speed_factors": [0.9, 1.0, 1.1], "noise_snr_db": [5, 20], "noise_prob": 0.7},
    "finetune": {"speed_factors": [0.9, 1.0, 1.1], "noise_snr_db": [5, 20], "noise_prob": 0.7,
                 "spec_freq_masks": 2, "spec_freq_width": 4, "spec_time_masks": 2, "spec_time_width": 5},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=8))


def config(kind, corpus, steps, extra=()):
    return build_config(kind, "tiny", None, SETTINGS[kind] + list(extra), train_data=corpus, steps=steps)


@pytest.mark.parametrize("augmented", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_stop_and_resume_gives_identical_weights(kind, augmented, corpus, tmp_path):
    steps = 7  # several batches per epoch: the stop falls in the middle of an epoch
    extra = [("augment", AUGMENT[kind])] if augmented else []
    straight = run_training(kind, config(kind, corpus, steps, extra), str(tmp_path / "straight"), progress=False)
    run_training(kind, config(kind, corpus, steps, extra), str(tmp_path / "resumed"), stop_after=3, progress=False)
    stopped = load_checkpoint(tmp_path / "resumed", kind=kind)
    assert stopped.step == 3 and not stopped.finished
    assert stopped.payload["progress"]["batch_in_epoch"] > 0
    resumed = run_training(kind, config(kind, corpus, steps, extra), str(tmp_path / "resumed"), progress=False)

    a = load_checkpoint(tmp_path / "straight", kind=kind)
    b = load_checkpoint(tmp_path / "resumed", kind=kind)
    assert a.step == b.step == steps and a.finished
    assert a.payload["progress"] == b.payload["progress"]
    assert a.payload["progress"]["epoch"] >= 1  # the run crossed an epoch boundary
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    assert straight == resumed
    rows = [list(csv.DictReader(open(tmp_path / run / "train.csv"))) for run in ("straight", "resumed")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [str(s) for s in range(1, steps + 1)]
    last_metric = [k for k in rows[0][0] if k not in ("step", "epoch", "lr", "elapsed_s")][0]
    assert [r[last_metric] for r in rows[0]] == [r[last_metric] for r in rows[1]]


def test_checkpoint_alone_rebuilds_the_model(corpus, tmp_path):
    run_training("finetune", config("finetune", corpus, 2), str(tmp_path / "ft"), progress=False)
    checkpoint = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert checkpoint.kind == "finetune" and checkpoint.config.head == "lstm"
    assert (tmp_path / "ft" / "config.yaml").exists() and (tmp_path / "ft" / "encoder.yaml").exists()
    model = checkpoint.model
    wave = torch.randn(1, 8000)
    log_probs, _ = model(wave)
    assert log_probs.shape[-1] == len(model.vocab) == 29
    # a finished run started again does nothing and keeps its checkpoint
    before = (tmp_path / "ft" / "checkpoint.pt").stat().st_mtime_ns
    run_training("finetune", config("finetune", corpus, 2), str(tmp_path / "ft"), progress=False)
    assert (tmp_path / "ft" / "checkpoint.pt").stat().st_mtime_ns == before


def test_finetune_from_a_pretrained_encoder_copies_its_weights(corpus, tmp_path):
    run_training("pretrain", config("pretrain", corpus, 2), str(tmp_path / "pt"), progress=False)
    ft = build_config("finetune", "tiny", None, [("steps", 1), ("freeze_encoder_steps", 1)],
                      train_data=corpus, init=str(tmp_path / "pt"))
    run_training("finetune", ft, str(tmp_path / "ft"), progress=False)
    pretrained = load_checkpoint(tmp_path / "pt", kind="pretrain").model
    fine_tuned = load_checkpoint(tmp_path / "ft", kind="finetune").model
    pre, fine = pretrained.encoder.state_dict(), fine_tuned.encoder.state_dict()
    # one frozen warm-up step: the encoder is exactly the pretrained one
    for name, value in pre.items():
        assert torch.equal(value, fine[name]), name
    # and the time masks are wav2vec 2.0's learned masked-frame vector, not a fresh zero one
    assert pretrained.mask_embedding.abs().sum() > 0
    assert torch.equal(fine_tuned.mask_embedding, pretrained.mask_embedding)
