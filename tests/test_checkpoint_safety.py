"""Checkpoints load tensors and plain data only (a pickle cannot run code), check their format version,
and every error about their contents names the file."""

import pytest
import torch
from train_corpus import make_corpus

from streamssl.cli import main
from streamssl.train.checkpoint import FORMAT, VERSION, build_model, load_checkpoint, save_checkpoint
from streamssl.train.config import preset


class Payload:
    """Unpickling this runs ``exec``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def good_payload() -> dict:
    config = preset("finetune", "tiny")
    torch.manual_seed(0)
    model = build_model("finetune", config, config.encoder)
    return {"kind": "finetune", "encoder_config": config.encoder.to_dict(), "task_config": config.to_dict(),
            "vocab": model.vocab.symbols, "model": model.state_dict(),
            "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}}


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, **good_payload(), "extra": Payload(marker)}, path)
    return path, marker


def test_hostile_pickle_runs_nothing_and_is_named(hostile, tmp_path, capsys):
    path, marker = hostile
    with pytest.raises(ValueError, match=f"{path} is not a readable checkpoint") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value)
    corpus = make_corpus(tmp_path / "corpus", n=2)
    # every command that opens a checkpoint: evaluate, stream, finetune --init, and resuming a run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(path.read_bytes())
    for argv in (["evaluate", "--checkpoint", str(path), "--data", str(corpus)],
                 ["stream", "--checkpoint", str(path), str(corpus.parent / "utt000.wav")],
                 ["finetune", "--preset", "tiny", "--init", str(path), "--train", str(corpus),
                  "--out", str(tmp_path / "ft")],
                 ["finetune", "--preset", "tiny", "--train", str(corpus), "--out", str(run_dir), "--no-progress"]):
        assert main(argv) == 2, argv
        assert "not a readable checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    # The file really was hostile: an unrestricted load runs its code.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_newer_or_invalid_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1, **good_payload()}, path)
    with pytest.raises(ValueError, match=f"{path}: checkpoint format version {VERSION + 1} is newer"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "version": "one", **good_payload()}, path)
    with pytest.raises(ValueError, match=f"{path}: checkpoint format version 'one' is not a valid version"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p["task_config"].update(lr=-1.0), "lr must be positive"),
    (lambda p: p["encoder_config"].update(n_heads=5), "divisible"),
    (lambda p: p["encoder_config"].update(colour="red"), "unknown EncoderConfig keys"),
    (lambda p: p.pop("progress"), "lacks the entry 'progress'"),
    (lambda p: p["model"].pop(next(iter(p["model"]))), "Missing key"),
])
def test_config_errors_inside_a_checkpoint_name_the_file(tmp_path, damage, message):
    payload = good_payload()
    damage(payload)
    path = tmp_path / "damaged.pt"
    save_checkpoint(path, payload)
    with pytest.raises(ValueError, match=f"^{path}: .*{message}"):
        load_checkpoint(path)
