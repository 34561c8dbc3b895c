"""Lhotse in and out: a corpus round-trips through a Lhotse cut manifest and Lhotse Shar shards to the same
utterances and samples, trains to the same loss for a fixed seed from every format, resumes mid-epoch, and
keeps ``--skip-bad``'s promise (every problem named, or left out and reported)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from train_corpus import RATE, make_corpus, tone_audio

pytest.importorskip("lhotse")

from streamssl.cli import main  # noqa: E402
from streamssl.data import Utterance, check_corpus, load_utterances  # noqa: E402
from streamssl.data.lhotse import CutUtterance, write_cuts  # noqa: E402
from streamssl.train.checkpoint import load_checkpoint  # noqa: E402

N = 8
FORMATS = ("jsonl", "lhotse", "shar")
# One batch per step in every format: the loss then does not depend on how a sampler orders utterances.
ONE_BATCH = ["--set", "max_batch_seconds=100", "--set", "num_buckets=1", "--set", "encoder.dropout=0.0"]


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    jsonl = make_corpus(root / "tones", n=N)
    sources = {"jsonl": str(jsonl), "lhotse": str(root / "cuts.jsonl.gz"), "shar": str(root / "shar")}
    assert main(["corpus", "manifest", sources["jsonl"], "--format", "lhotse", "--out", sources["lhotse"]]) == 0
    assert main(["corpus", "shard", sources["lhotse"], "--out", sources["shar"], "--shard-size", "3"]) == 0
    return sources


def test_every_format_holds_the_same_utterances_and_samples(formats, tmp_path):
    loaded = {name: load_utterances(src, decode=True) for name, src in formats.items()}
    assert sorted(p.name for p in Path(formats["shar"]).iterdir()) == [
        f"{kind}.00000{i}.{ext}" for kind, ext in (("cuts", "jsonl.gz"), ("recording", "tar")) for i in range(3)]
    original = loaded["jsonl"]
    assert [u.id for u in loaded["lhotse"]] == [u.id for u in original]  # a manifest keeps its order
    assert sorted(u.id for u in loaded["shar"]) == sorted(u.id for u in original)
    assert [u.id for u in loaded["shar"]] != [u.id for u in original]  # shards hold shuffled cuts
    for name in ("lhotse", "shar"):
        by_id = {u.id: u for u in loaded[name]}
        for utt in original:
            other = by_id[utt.id]
            assert isinstance(other, CutUtterance)
            assert (other.text, other.speaker) == (utt.text, utt.speaker)
            assert other.duration == pytest.approx(utt.duration, abs=1e-9)
            assert np.array_equal(other.read_audio(), utt.read_audio()), f"{name}: {utt.id} samples differ"
    # A cut manifest of whole files goes back to the same JSONL manifest; shards hold no files to name.
    back = tmp_path / "back.jsonl"
    assert main(["corpus", "manifest", formats["lhotse"], "--out", str(back)]) == 0
    assert load_utterances(back) == original
    assert main(["corpus", "manifest", formats["shar"], "--out", str(tmp_path / "no.jsonl")]) == 2
    assert not (tmp_path / "no.jsonl").exists()


def final_row(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run / "train.csv").open()))
    return {k: float(v) for k, v in rows[-1].items() if k != "elapsed_s"}


@pytest.mark.slow
@pytest.mark.parametrize("kind, preset, metric", [("finetune", "tiny", "ctc_per_char"),
                                                  ("pretrain", "tiny", "objective"),
                                                  ("pretrain", "tiny-fbank", "objective")])  # + frontend statistics
def test_every_format_trains_to_the_same_loss(kind, preset, metric, formats, tmp_path):
    rows = {}
    for name, src in formats.items():
        out = tmp_path / name
        assert main([kind, "--preset", preset, "--train", src, "--out", str(out), "--steps", "3", "--no-progress",
                     "--device", "cpu", "--set", "log_every=1", *ONE_BATCH]) == 0
        rows[name] = final_row(out)
    assert rows["jsonl"][metric] > 0
    for name in ("lhotse", "shar"):
        assert rows[name].keys() == rows["jsonl"].keys()
        for key, value in rows["jsonl"].items():
            assert rows[name][key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{name}: {key}"


@pytest.mark.slow
def test_a_shar_run_resumes_mid_epoch_exactly(formats, tmp_path):
    common = ["finetune", "--preset", "tiny", "--train", formats["shar"], "--steps", "4", "--no-progress",
              "--device", "cpu", "--set", "max_batch_seconds=2", "--set", "encoder.dropout=0.0"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--out", str(tmp_path / "halves"), "--stop-after", "2"]) == 0
    halfway = load_checkpoint(tmp_path / "halves", kind="finetune").payload["progress"]
    assert halfway["step"] == 2 and halfway["batch_in_epoch"] > 0  # the stop really fell inside an epoch
    assert main([*common, "--out", str(tmp_path / "halves")]) == 0
    whole = load_checkpoint(tmp_path / "whole", kind="finetune")
    halves = load_checkpoint(tmp_path / "halves", kind="finetune")
    assert whole.payload["progress"] == halves.payload["progress"]
    for name, value in whole.payload["model"].items():
        assert torch.equal(halves.payload["model"][name], value), name


def bad_cuts(root: Path) -> tuple[Path, dict[str, str]]:
    """A cut manifest of the tone corpus plus one cut per kind of problem; returns it and, per problem
    kind, the path its problem names (the cut in the manifest, or the audio file that does not decode)."""
    good = load_utterances(make_corpus(root / "tones", n=4))
    rng = np.random.default_rng(3)
    gone = root / "gone.wav"
    soundfile.write(gone, tone_audio("CAT", rng), RATE)
    truncated = root / "truncated.flac"
    soundfile.write(truncated, tone_audio("DOG SUN", rng), RATE)
    extra = [Utterance("gone", str(gone), 0.5, "CAT", "s9"),
             Utterance("cyrillic", good[0].audio, good[0].duration, "ЖУК", "s9"),
             Utterance("truncated", str(truncated), 0.5, "DOG SUN", "s9")]
    path = root / "cuts.jsonl.gz"
    write_cuts(good + extra, path)
    gone.unlink()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # the header still says the whole length
    return path, {"missing-audio": f"{path}#gone", "unsupported-characters": f"{path}#cyrillic",
                  "unreadable": str(truncated.resolve())}


def test_check_names_every_problem_of_a_cut_manifest(tmp_path):
    path, planted = bad_cuts(tmp_path)
    found = {p.kind: p.path for p in check_corpus(path)}
    assert found == planted
    assert check_corpus(path, decode=False) == [p for p in check_corpus(path) if p.kind != "unreadable"]
    assert main(["corpus", "check", str(path)]) == 1


@pytest.mark.slow
def test_skip_bad_on_a_cut_manifest(tmp_path, capsys, caplog):
    path, planted = bad_cuts(tmp_path)
    run = ["finetune", "--preset", "tiny", "--train", str(path), "--steps", "2", "--no-progress", "--device", "cpu",
           *ONE_BATCH]
    assert main([*run, "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "fails `streamssl corpus check` (2 problems)" in error and "--skip-bad" in error
    assert f"{planted['missing-audio']}: missing-audio" in error
    assert f"{planted['unsupported-characters']}: unsupported-characters" in error
    assert not (tmp_path / "refused").exists()  # refused before any model was built
    # The truncated file passes the metadata check; its audio fails as it is loaded and is left out.
    assert main([*run, "--out", str(tmp_path / "skipped"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert f"skipped (training data): {planted['missing-audio']}: missing-audio" in out
    assert f"skipped (training data): {planted['unsupported-characters']}: unsupported-characters" in out
    assert "5 training utterances" in out  # the truncated file is still among them
    warnings = [r.getMessage() for r in caplog.records if r.name == "streamssl.train.data"]
    assert warnings and all(w == f"skipped (training data): utterance truncated: {planted['unreadable']}: "
                            "cannot decode audio: Error : flac decoder lost sync." for w in warnings), warnings
    # Evaluation decodes everything first, so all three are reported and left out.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "skipped"), "--data", str(path), "--skip-bad",
                 "--decoder", "greedy", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_utterances"] == 4
    skipped = [line.removeprefix("skipped (evaluation data): ") for line in captured.err.splitlines()
               if line.startswith("skipped (evaluation data): ")]
    assert sorted(line.split(": ")[0] for line in skipped) == sorted(planted.values())


def test_a_decode_failure_without_skip_bad_names_the_cut(tmp_path, capsys):
    path, _ = bad_cuts(tmp_path)
    good_and_truncated = tmp_path / "two.jsonl.gz"
    kept = [u for u in load_utterances(path, skip_bad=True) if u.id in ("truncated",) or u.id.endswith("000")]
    write_cuts(kept, good_and_truncated)
    assert main(["finetune", "--preset", "tiny", "--train", str(good_and_truncated), "--steps", "2", "--no-progress",
                 "--device", "cpu", "--out", str(tmp_path / "run"), *ONE_BATCH]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert "utterance truncated" in error[-1] and "cannot decode audio" in error[-1] and "--skip-bad" in error[-1]


@pytest.mark.parametrize("argv, message", [
    (["corpus", "manifest", "{jsonl}", "--format", "lhotse", "--out", "{tmp}/cuts.jsonl"],
     "a lhotse manifest is a .jsonl.gz file"),
    (["corpus", "manifest", "{jsonl}", "--out", "{tmp}/cuts.jsonl.gz"], "a jsonl manifest is a .jsonl file"),
    (["corpus", "manifest", "{shar}", "--format", "lhotse", "--out", "{tmp}/again.jsonl.gz"],
     "keeps its audio in a Shar shard"),
    (["corpus", "shard", "{jsonl}", "--out", "{shar}"], "is not empty; shards go into a new folder"),
    (["corpus", "shard", "{jsonl}", "--out", "{tmp}/new", "--shard-size", "0"], "--shard-size must be at least 1"),
])
def test_bad_lhotse_commands_are_one_line_errors(argv, message, formats, tmp_path, capsys):
    values = {"jsonl": formats["jsonl"], "shar": formats["shar"], "tmp": str(tmp_path)}
    assert main([arg.format(**values) for arg in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
