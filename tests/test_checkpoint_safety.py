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
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    assert str(refused.value) == (f"{path} is not a streamssl checkpoint (it refers to exec, not only to tensors "
                                  "and plain data; such a file is never unpickled, since that could run code from it)")
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
        err = capsys.readouterr().err
        assert ".pt is not a streamssl checkpoint (it refers to exec" in err and "weights_only" not in err
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


def test_files_that_are_no_checkpoint_are_named_in_our_words(tmp_path, capsys):
    """Random bytes, YAML, JSON, a truncated or empty file: never torch's unpickler internals ("pop from
    empty list") or its advice to load with weights_only=False (which would run the file's code)."""
    good = tmp_path / "good.pt"
    save_checkpoint(good, good_payload())
    files = {"random.pt": bytes(range(256)) * 16, "config.yaml": b"encoder:\n  mixer: sa\nsteps: 10\n",
             "config.json": b'{"steps": 10}', "truncated.pt": good.read_bytes()[:4096], "empty.pt": b""}
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    expected = {
        "random.pt": "neither a zip archive nor a pickle, as torch.save writes; it starts with "
                     "b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07'",
        "config.yaml": "a text file, not the binary file torch.save writes; it starts with "
                       "'encoder:\\n  mixer: sa\\nste'",
        "config.json": "a text file, not the binary file torch.save writes; it starts with '{\"steps\": 10}'",
        "truncated.pt": "a zip archive without its end: truncated or damaged",
        "empty.pt": "the file is empty",
        "foreign.pt": "a PyTorch file, but without the 'streamssl-checkpoint' format entry that streamssl "
                      "pretrain and finetune write",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name, problem in expected.items():
        path = tmp_path / name
        with pytest.raises(ValueError) as refused:
            load_checkpoint(path)
        assert str(refused.value) == f"{path} is not a streamssl checkpoint ({problem})"
    code = main(["export", "--checkpoint", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"streamssl export: error: {tmp_path / 'config.yaml'} is not a streamssl checkpoint "
                                 f"({expected['config.yaml']})\n")
