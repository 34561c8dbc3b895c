"""Bad input is refused with a clear message before any training starts."""

import json

import pytest
from train_corpus import make_corpus

from streamssl.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=4))


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_unknown_config_key(kind, corpus, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.001\nmask_lenght: 5\n")
    code, _, err = run([kind, "--config", str(config), "--train", corpus, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "unknown" in err and "mask_lenght" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, message", [
    ("lr=-1", "lr must be positive"),
    ("encoder.n_heads=5", "divisible"),
    ("encoder.mixer=nope", "unknown mixer"),
    ("steps=2.5", "steps must be a positive integer"),
])
def test_impossible_values(setting, message, corpus, tmp_path, capsys):
    code, _, err = run(["pretrain", "--preset", "tiny", "--set", setting, "--train", corpus,
                        "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err


def test_bidirectional_head_on_a_streaming_encoder(corpus, tmp_path, capsys):
    code, _, err = run(["finetune", "--preset", "tiny", "--head", "lstm", "--set", "bidirectional=true",
                        "--train", corpus, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "bidirectional" in err
    assert not (tmp_path / "out").exists()


def test_init_and_encoder_together(corpus, tmp_path, capsys):
    code, _, err = run(["finetune", "--preset", "tiny", "--set", "encoder.d_model=64", "--init", "x.pt",
                        "--train", corpus, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not both" in err


def test_wrong_checkpoint_kind_and_missing_checkpoint(corpus, tmp_path, capsys):
    code, _, _ = run(["pretrain", "--preset", "tiny", "--steps", "1", "--train", corpus, "--out", str(tmp_path / "pt"),
                      "--no-progress"], capsys)
    assert code == 0
    code, _, err = run(["evaluate", "--checkpoint", str(tmp_path / "pt"), "--data", corpus], capsys)
    assert code == 2 and "is a pretrain checkpoint" in err and "streamssl finetune" in err
    code, _, err = run(["evaluate", "--checkpoint", str(tmp_path / "nothing.pt"), "--data", corpus], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(["finetune", "--preset", "tiny", "--init", str(tmp_path / "junk.pt"), "--train", corpus,
                        "--out", str(tmp_path / "ft")], capsys)
    assert code == 2 and "junk.pt is not a streamssl checkpoint (a text file" in err
    # the same folder with another configuration is not silently resumed
    code, _, err = run(["pretrain", "--preset", "tiny", "--steps", "1", "--lr", "0.5", "--train", corpus,
                        "--out", str(tmp_path / "pt")], capsys)
    assert code == 2 and "different configuration" in err and "lr" in err


def test_data_failing_corpus_check(corpus, tmp_path, capsys):
    bad = tmp_path / "bad"
    manifest = make_corpus(bad, n=4)
    (bad / "utt001.wav").write_bytes(b"RIFF....garbage")
    lines = manifest.read_text().splitlines()
    record = json.loads(lines[2])
    record["text"] = "DOG #4"
    lines[2] = json.dumps(record)
    manifest.write_text("\n".join(lines) + "\n")
    code, _, err = run(["finetune", "--preset", "tiny", "--train", str(manifest), "--out", str(tmp_path / "out")],
                       capsys)
    assert code == 2 and "corpus check" in err and "utt001.wav" in err and "--skip-bad" in err
    assert not (tmp_path / "out").exists()
    code, out, err = run(["finetune", "--preset", "tiny", "--steps", "1", "--skip-bad", "--train", str(manifest),
                          "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 0 and "utt001.wav" in out + err
