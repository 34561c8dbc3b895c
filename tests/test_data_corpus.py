"""Readers, manifests, the checker and the synthesiser, on small corpora the tests build themselves."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from streamssl.cli import main
from streamssl.data import (CorpusError, Utterance, check_corpus, load_audio, load_utterances, read_manifest,
                            synthesize_corpus, write_manifest)
from streamssl.data.manifest import ManifestError

HOURS = 0.02  # 72 s of audio: one speaker per split


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize_corpus(out, HOURS, seed=7, workers=2, progress=False)
    return out, summary


@pytest.fixture
def train_copy(corpus, tmp_path):
    out, _ = corpus
    root = tmp_path / "train-clean-5"
    shutil.copytree(out / "LibriSpeech" / "train", root)
    return root


# --- the synthesiser -------------------------------------------------------------------------------------------

def test_synth_layout_manifests_and_disjoint_speakers(corpus):
    out, summary = corpus
    assert abs(summary["hours"] - HOURS) < 0.25 * HOURS
    speakers = {}
    for split in ("train", "dev", "test"):
        utterances = read_manifest(out / f"{split}.jsonl")
        assert len(utterances) == summary["utterances"][split] > 0
        speakers[split] = {utt.speaker for utt in utterances}
        for utt in utterances:
            path = Path(utt.audio)
            speaker, chapter, _ = utt.id.split("-")
            assert path == out / "LibriSpeech" / split / speaker / chapter / f"{utt.id}.flac"
            info = soundfile.info(str(path))
            assert info.samplerate == 16000 and info.channels == 1
            assert utt.duration == pytest.approx(info.frames / 16000)
            lines = (path.parent / f"{speaker}-{chapter}.trans.txt").read_text().splitlines()
            assert f"{utt.id} {utt.text}" in lines
    assert not speakers["train"] & speakers["dev"] and not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    assert (out / "SPEAKERS.txt").read_text().count("\n") == 1 + sum(len(s) for s in speakers.values())


def test_synth_same_seed_is_byte_identical_whatever_the_workers(corpus, tmp_path):
    out, _ = corpus
    synthesize_corpus(tmp_path / "again", HOURS, seed=7, workers=1, progress=False)
    reference = tree_digest(out)
    assert tree_digest(tmp_path / "again") == reference
    synthesize_corpus(tmp_path / "other", HOURS, seed=8, workers=2, progress=False)
    assert tree_digest(tmp_path / "other") != reference


def test_synth_noise_at_requested_snr(corpus, tmp_path):
    out, _ = corpus
    synthesize_corpus(tmp_path / "noisy", HOURS, seed=7, noise_snr_db=10.0, progress=False)
    clean_utts = read_manifest(out / "dev.jsonl")
    noisy_utts = read_manifest(tmp_path / "noisy" / "dev.jsonl")
    assert [u.text for u in clean_utts] == [u.text for u in noisy_utts]
    for clean_utt, noisy_utt in zip(clean_utts, noisy_utts):
        clean, noisy = load_audio(clean_utt.audio).astype(np.float64), load_audio(noisy_utt.audio).astype(np.float64)
        gain = noisy @ clean / (clean @ clean)  # both may have been scaled down to the same peak level
        snr_db = 10 * np.log10(np.sum((gain * clean) ** 2) / np.sum((noisy - gain * clean) ** 2))
        assert snr_db == pytest.approx(10.0, abs=0.5)


def test_synth_from_text_file_spells_out_numbers(tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("The 3 little pigs.\n\nIt costs $5, said Mr Smith & his wife.\n", encoding="utf-8")
    summary = synthesize_corpus(tmp_path / "c", 0.003, seed=1, text_file=text, workers=2, progress=False)
    texts = {utt.text for split in ("train", "dev", "test") for utt in read_manifest(tmp_path / "c" / f"{split}.jsonl")}
    assert texts <= {"THE THREE LITTLE PIGS", "IT COSTS FIVE DOLLARS SAID MR SMITH AND HIS WIFE"}
    assert sum(summary["utterances"].values()) >= 3


def test_synth_rejects_bad_arguments(tmp_path, corpus):
    bad = tmp_path / "bad.txt"
    bad.write_text("fine line\nЖУК line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2: unsupported characters 'Ж'"):
        synthesize_corpus(tmp_path / "x", 0.01, seed=1, text_file=bad)
    with pytest.raises(ValueError, match="already exists"):
        synthesize_corpus(corpus[0], 0.01, seed=1)
    with pytest.raises(ValueError, match="hours must be positive"):
        synthesize_corpus(tmp_path / "y", 0, seed=1)


# --- readers and manifests ---------------------------------------------------------------------------------------

def test_librispeech_reader_matches_manifest(corpus):
    out, _ = corpus
    from_tree = load_utterances(out / "LibriSpeech" / "dev")
    from_manifest = load_utterances(out / "dev.jsonl")
    assert from_tree == from_manifest
    assert all(utt.speaker == utt.id.split("-")[0] for utt in from_tree)


def test_manifest_round_trip_relative_paths(corpus, tmp_path):
    out, _ = corpus
    utterances = load_utterances(out / "test.jsonl")
    moved = tmp_path / "moved"
    shutil.copytree(out / "LibriSpeech" / "test", moved / "LibriSpeech" / "test")
    shutil.copy(out / "test.jsonl", moved / "test.jsonl")
    relocated = read_manifest(moved / "test.jsonl")
    assert [Path(u.audio).relative_to(moved) for u in relocated] == [Path(u.audio).relative_to(out) for u in utterances]
    write_manifest(relocated, moved / "again.jsonl")
    assert (moved / "again.jsonl").read_text() == (out / "test.jsonl").read_text()
    first = json.loads((moved / "again.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "audio", "duration", "text", "speaker"} and not Path(first["audio"]).is_absolute()


def test_manifest_errors_name_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "audio": "a.flac", "duration": 1.0, "text": "A", "speaker": "s"}\n{"id": "b"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: missing field\(s\) audio, duration, text, speaker"):
        read_manifest(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"m.jsonl:1: not valid JSON"):
        read_manifest(path)


def test_folder_reader_resamples_and_downmixes(tmp_path, caplog):
    rng = np.random.default_rng(0)
    (tmp_path / "alice").mkdir()
    stereo = rng.uniform(-0.5, 0.5, size=(22050, 2)).astype(np.float32)
    soundfile.write(tmp_path / "alice" / "one.wav", stereo, 22050)
    (tmp_path / "alice" / "one.txt").write_text("Hello, 2 worlds!\n")
    soundfile.write(tmp_path / "two.flac", rng.uniform(-0.5, 0.5, 8000).astype(np.float32), 16000)
    (tmp_path / "two.txt").write_text("second")
    with caplog.at_level(logging.WARNING):
        utterances = load_utterances(tmp_path)
    assert [(u.id, u.text, u.speaker, u.duration) for u in utterances] == [
        ("alice/one", "HELLO TWO WORLDS", "alice", 1.0), ("two", "SECOND", "unknown", 0.5)]
    assert "1 file(s) at 22050 Hz" in caplog.text
    audio = load_audio(utterances[0].audio)
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    downmixed = stereo.mean(axis=1)
    assert np.corrcoef(audio[:16000:4][100:-100], np.interp(np.arange(0, 16000, 4) * 22050 / 16000,
                                                            np.arange(22050), downmixed)[100:-100])[0, 1] > 0.3


# --- planted problems ---------------------------------------------------------------------------------------------

def plant_problems(root: Path) -> dict[str, str]:
    """Break a copied LibriSpeech tree in every way the checker knows; return {kind: path that names it}."""
    flacs = sorted(root.rglob("*.flac"))
    assert len(flacs) >= 5
    transcript = next(root.rglob("*.trans.txt"))
    lines = transcript.read_text().splitlines()
    planted = {}
    flacs[0].write_bytes(b"this is not a flac file" * 10)
    planted["unreadable"] = str(flacs[0])
    data = flacs[1].read_bytes()
    flacs[1].write_bytes(data[: len(data) // 2])
    planted["truncated"] = str(flacs[1])
    flacs[2].unlink()
    planted["missing-audio"] = f"{transcript}:3"
    stray = flacs[3].parent / f"{flacs[3].stem[:-4]}9999.flac"
    shutil.copy(flacs[3], stray)
    planted["missing-transcript"] = str(stray)
    no_frames = flacs[4].parent / f"{flacs[4].stem[:-4]}9998.wav"
    soundfile.write(no_frames, np.zeros(0, dtype=np.float32), 16000)  # a valid header with no samples
    empty = flacs[4].parent / f"{flacs[4].stem[:-4]}9997.flac"
    empty.write_bytes(b"")
    lines += [f"{no_frames.stem} SILENCE", f"{empty.stem} NOTHING"]
    planted["zero-length"] = str(no_frames)
    planted["empty-file"] = str(empty)
    lines[3] = lines[3].split(" ")[0] + " ЖУК BEETLE"
    planted["unsupported-characters"] = f"{transcript}:4"
    transcript.write_text("\n".join(lines) + "\n")
    return planted


def test_check_finds_every_planted_problem(train_copy):
    planted = plant_problems(train_copy)
    problems = check_corpus(train_copy)
    found = {(p.kind, p.path) for p in problems}
    kind_of = {"truncated": "unreadable", "empty-file": "zero-length"}
    assert found == {(kind_of.get(kind, kind), path) for kind, path in planted.items()}
    assert len(problems) == len(planted)
    assert all(p.path in str(p) for p in problems)
    # Reading headers only cannot see the truncation.
    assert ("unreadable", planted["truncated"]) not in {(p.kind, p.path) for p in check_corpus(train_copy, decode=False)}


def test_loader_refuses_or_skips_with_report(train_copy, caplog):
    planted = plant_problems(train_copy)
    with pytest.raises(CorpusError) as refused:
        load_utterances(train_copy)
    assert {p.kind for p in refused.value.problems} == set(planted) - {"truncated", "empty-file"}
    assert len(refused.value.problems) == len(planted) - 1
    for path in (planted["unreadable"], planted["missing-transcript"]):
        assert path in str(refused.value)
    with caplog.at_level(logging.WARNING):
        good = load_utterances(train_copy, skip_bad=True)
    assert f"skipping {len(refused.value.problems)} problem(s)" in caplog.text
    assert planted["unreadable"] in caplog.text
    listed = sum(1 for t in train_copy.rglob("*.trans.txt") for line in t.read_text().splitlines() if line)
    # Skipped: the unreadable, two zero-length, the unsupported-characters and the deleted one's lines. The
    # truncated file's header is intact, so only decoding (the checker) finds it.
    assert len(good) == listed - 5


def test_dataset_names_corrupt_utterance(train_copy):
    from streamssl.data import AudioDataset

    utterances = load_utterances(train_copy)
    Path(utterances[0].audio).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"utterance {utterances[0].id}: .*{Path(utterances[0].audio).name}"):
        AudioDataset(utterances)[0]


def test_cli_check_manifest_and_exit_codes(train_copy, corpus, tmp_path, capsys):
    out, _ = corpus
    assert main(["corpus", "check", str(out / "dev.jsonl")]) == 0
    planted = plant_problems(train_copy)
    assert main(["corpus", "check", str(train_copy)]) == 1
    printed = capsys.readouterr().out
    for path in planted.values():
        assert path in printed
    assert main(["corpus", "manifest", str(train_copy), "--out", str(tmp_path / "m.jsonl")]) == 2
    # The manifest command decodes every file, so it finds the truncated one too.
    assert f"{len(planted)} problem(s)" in capsys.readouterr().err
    assert main(["corpus", "manifest", str(train_copy), "--out", str(tmp_path / "m.jsonl"), "--skip-bad"]) == 0
    written = read_manifest(tmp_path / "m.jsonl")
    assert len(written) == len(load_utterances(train_copy, skip_bad=True)) - 1
    assert planted["truncated"] not in {utt.audio for utt in written}


def test_cli_synth(tmp_path, capsys):
    assert main(["corpus", "synth", "--out", str(tmp_path), "--hours", "0.003", "--seed", "3", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hours"] > 0 and (tmp_path / "train.jsonl").is_file()
    assert isinstance(read_manifest(tmp_path / "train.jsonl")[0], Utterance)


def test_synth_varied_noise_leaves_some_utterances_clean_and_noises_others(corpus, tmp_path):
    out, _ = corpus
    synthesize_corpus(tmp_path / "varied", HOURS, seed=7, varied_noise=True, progress=False)
    clean_utts = read_manifest(out / "train.jsonl")
    varied_utts = read_manifest(tmp_path / "varied" / "train.jsonl")
    assert [u.text for u in clean_utts] == [u.text for u in varied_utts]
    snrs = []
    for clean_utt, varied_utt in zip(clean_utts, varied_utts):
        clean, varied = load_audio(clean_utt.audio).astype(np.float64), load_audio(varied_utt.audio).astype(np.float64)
        gain = varied @ clean / (clean @ clean)
        residual = np.sum((varied - gain * clean) ** 2)
        snrs.append(np.inf if residual < 1e-6 * np.sum(clean ** 2) else 10 * np.log10(np.sum((gain * clean) ** 2) / residual))
    noisy = [s for s in snrs if np.isfinite(s)]
    assert 0 < len(noisy) < len(snrs)
    assert all(4.5 < s < 25.5 for s in noisy)
    with pytest.raises(ValueError, match="not both"):
        synthesize_corpus(tmp_path / "both", HOURS, seed=7, noise_snr_db=10.0, varied_noise=True, progress=False)


def test_bigram_prose_is_deterministic_general_english():
    from streamssl.data.prose import MAX_WORDS, MIN_WORDS, BigramChain, blocked_words, is_blocked

    chain = BigramChain.from_wordsegment()
    blocked, prefixes = blocked_words()
    assert len(blocked) > 500 and not any(is_blocked(w, blocked, prefixes) for w in chain.words.tolist())
    first = [chain.sentence(np.random.default_rng(5)) for _ in range(3)]
    assert first == [chain.sentence(np.random.default_rng(5)) for _ in range(3)]
    sentences = [chain.sentence(np.random.default_rng(seed)) for seed in range(200)]
    words = [w for s in sentences for w in s.rstrip(".").lower().split()]
    assert all(len(s.split()) <= MAX_WORDS for s in sentences)
    assert sum(len(s.split()) >= MIN_WORDS for s in sentences) > 150
    assert len(set(words)) > 0.5 * len(words)   # a wide vocabulary, not a handful of template words
    assert set(words) <= set(chain.words.tolist())


def test_audio_blocks_equal_load_audio_in_bounded_pieces(tmp_path):
    from streamssl.data import audio_blocks

    rng = np.random.default_rng(3)
    native = tmp_path / "native.flac"
    soundfile.write(native, rng.uniform(-0.5, 0.5, 40000).astype(np.float32), 16000)
    blocks = list(audio_blocks(native, block_frames=4096))
    assert max(block.size for block in blocks) == 4096
    assert np.array_equal(np.concatenate(blocks), load_audio(native))
    stereo = tmp_path / "stereo_44k.wav"
    soundfile.write(stereo, rng.uniform(-0.5, 0.5, (44100, 2)).astype(np.float32), 44100)
    streamed = np.concatenate(list(audio_blocks(stereo, block_frames=5000)))
    whole = load_audio(stereo)
    assert streamed.shape == whole.shape == (16000,)
    assert np.abs(streamed - whole)[100:-100].max() < 1e-3  # soxr's streaming and one-shot forms agree
    truncated = tmp_path / "cut.flac"
    soundfile.write(truncated, rng.uniform(-0.5, 0.5, 64000).astype(np.float32), 16000)
    truncated.write_bytes(truncated.read_bytes()[:20000])
    with pytest.raises(ValueError, match="cut.flac"):
        list(audio_blocks(truncated))


@pytest.mark.parametrize("make, message", [(lambda p: None, "no such file"), (lambda p: p.mkdir(), "is a folder")])
def test_missing_path_or_folder_as_audio_is_named(tmp_path, make, message):
    from streamssl.data import audio_blocks, audio_info

    path = tmp_path / "talk.wav"
    make(path)
    for read in (audio_info, load_audio, lambda p: list(audio_blocks(p))):
        with pytest.raises(ValueError, match=f"talk.wav: {message}"):
            read(path)


def test_sentences_depend_on_the_seed_not_on_the_clock(monkeypatch):
    """No Faker call that reads today's date (they draw between 1970 and now, so the corpus would drift
    with the clock): with Faker's clock made to fail, the generator still writes every kind of sentence."""
    from faker.providers.date_time import Provider

    from streamssl.data.synth import SentenceGenerator

    def no_clock(*args, **kwargs):
        raise AssertionError("a sentence template read the clock")

    monkeypatch.setattr(Provider, "unix_time", no_clock)
    first = [SentenceGenerator(0)() for _ in range(1)]
    generator = SentenceGenerator(0)
    sentences = [generator() for _ in range(400)]
    assert sentences[0] == first[0]
    assert any(" said " in s and s.rstrip(".").split()[-1] in
               ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday") for s in sentences)
