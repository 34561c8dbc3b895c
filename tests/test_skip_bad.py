"""Every problem ``corpus check`` finds is fatal (the file named, before any model is built) or, with
``--skip-bad``, really left out, in every command that reads a corpus."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from train_corpus import RATE, make_corpus, tone_audio

from streamssl.cli import main
from streamssl.data import check_corpus, read_manifest

N_GOOD = 4


def good_folder(root: Path) -> Path:
    """A folder of ``N_GOOD`` tone WAVs, each with its ``.txt`` transcript beside it."""
    manifest = make_corpus(root / "tones", n=N_GOOD)
    folder = root / "corpus"
    folder.mkdir()
    for utt in read_manifest(manifest):
        audio = Path(utt.audio)
        audio.rename(folder / audio.name)
        (folder / audio.with_suffix(".txt").name).write_text(utt.text + "\n")
    return folder


def _tone(seconds: float = 0.5) -> np.ndarray:
    return tone_audio("CAT", np.random.default_rng(1))[: int(seconds * RATE)]


def plant(folder: Path, kind: str) -> tuple[str, int]:
    """Add one problem of ``kind``; return the path the checker names and the utterances still usable."""
    target = folder / "zz.wav"
    transcript = folder / "zz.txt"
    transcript.write_text("DOG\n")
    usable = N_GOOD
    if kind == "not-audio":
        target.write_bytes(b"this is not audio at all" * 20)
    elif kind == "truncated":
        target = folder / "zz.flac"
        soundfile.write(target, _tone(2.0), RATE)
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])  # the header still says 2 s
    elif kind == "zero-samples":
        soundfile.write(target, np.zeros(0, dtype=np.float32), RATE)
    elif kind == "zero-bytes":
        target = folder / "zz.flac"
        target.write_bytes(b"")
    elif kind == "missing-transcript":
        soundfile.write(target, _tone(), RATE)
        transcript.unlink()
    elif kind == "missing-audio":
        target = transcript
    elif kind == "unsupported-characters":
        soundfile.write(target, _tone(), RATE)
        transcript.write_text("ЖУК\n")
        target = transcript
    elif kind == "empty-transcript":
        soundfile.write(target, _tone(), RATE)
        transcript.write_text("?!\n")
        target = transcript
    elif kind == "not-utf8-transcript":
        soundfile.write(target, _tone(), RATE)
        transcript.write_bytes(b"\xff\xfe\xfa DOG\n")
        target = transcript
    elif kind == "duplicate-id":
        soundfile.write(folder / "zz.flac", _tone(), RATE)
        soundfile.write(target, _tone(), RATE)
        usable = N_GOOD + 1  # zz.flac is kept, the second zz.* is the problem
    else:
        raise AssertionError(kind)
    assert [p.path for p in check_corpus(folder)] == [str(target)]
    return str(target), usable


KINDS = ["not-audio", "truncated", "zero-samples", "zero-bytes", "missing-transcript", "missing-audio",
         "unsupported-characters", "empty-transcript", "not-utf8-transcript", "duplicate-id"]
COMMANDS = ["pretrain", "finetune", "evaluate", "manifest"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    corpus = good_folder(root)
    out = root / "run"
    assert main(["finetune", "--preset", "tiny", "--steps", "1", "--train", str(corpus), "--out", str(out),
                 "--no-progress"]) == 0
    return out


def command_line(command: str, corpus: Path, out: Path, checkpoint: Path) -> list[str]:
    if command in ("pretrain", "finetune"):
        return [command, "--preset", "tiny", "--steps", "1", "--train", str(corpus), "--out", str(out),
                "--no-progress"]
    if command == "evaluate":
        return ["evaluate", "--checkpoint", str(checkpoint), "--data", str(corpus), "--json"]
    return ["corpus", "manifest", str(corpus), "--out", str(out / "manifest.jsonl")]


def used_utterances(command: str, out: Path, stdout: str) -> int:
    if command in ("pretrain", "finetune"):
        line = next(line for line in stdout.splitlines() if " training utterances" in line)
        return int(line.split(" training utterances")[0].rsplit(" ", 1)[1])
    if command == "evaluate":
        return json.loads(stdout[stdout.index("{"):])["n_utterances"]
    return len(read_manifest(out / "manifest.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", KINDS)
def test_problem_is_fatal_or_really_skipped(kind, command, finetuned, tmp_path, capsys, caplog):
    corpus = good_folder(tmp_path)
    bad_path, usable = plant(corpus, kind)
    out = tmp_path / "out"
    argv = command_line(command, corpus, out, finetuned)

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert bad_path in captured.err and "--skip-bad" in captured.err
    assert not out.exists()  # refused before any model or file was made

    assert main(argv + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    # corpus manifest reports through the streamssl.data logger (stderr on the command line)
    assert bad_path in captured.out + captured.err + caplog.text
    assert used_utterances(command, out, captured.out) == usable
    if command == "manifest":
        assert bad_path not in {u.audio for u in read_manifest(out / "manifest.jsonl")}


def test_evaluate_checks_data_before_the_checkpoint(tmp_path, capsys):
    """A bad evaluation corpus fails before the checkpoint is opened (here it does not even exist)."""
    corpus = good_folder(tmp_path)
    bad_path, _ = plant(corpus, "truncated")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert bad_path in err and "none.pt" not in err


def test_evaluate_refuses_bad_parameters_and_overlong_offline_utterances(finetuned, tmp_path, capsys):
    corpus = good_folder(tmp_path)
    base = ["evaluate", "--checkpoint", str(finetuned), "--data", str(corpus), "--json", "--quiet"]
    assert main(base + ["--streaming", "--chunk-ms", "-5"]) == 2
    assert "--chunk-ms must be positive, got -5" in capsys.readouterr().err
    longest = max(read_manifest_folder(corpus), key=lambda item: item[1])
    assert main(base + ["--max-offline-s", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"utterance {longest[0]}" in err and "--streaming" in err and err.count("\n") == 1
    # the same data streams, and offline runs once the limit allows it
    assert main(base + ["--max-offline-s", "0.5", "--streaming"]) == 0
    assert json.loads(capsys.readouterr().out)["n_utterances"] == N_GOOD


def read_manifest_folder(corpus: Path) -> list[tuple[str, float]]:
    from streamssl.data import load_utterances

    return [(utt.id, utt.duration) for utt in load_utterances(corpus)]
