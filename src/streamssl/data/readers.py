"""Readers for the corpus layouts: LibriSpeech, a folder of audio with ``.txt`` transcripts, a manifest, and
(through :mod:`streamssl.data.lhotse`) a Lhotse cut manifest or Lhotse Shar shards.

Each reader returns the good utterances and every problem it found; :func:`load_utterances` refuses a corpus
with problems unless told to skip them, and then logs what it skipped.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from streamssl.data.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, audio_info
from streamssl.data.lhotse import CUTS_SUFFIX, cut_layout, scan_cuts
from streamssl.data.manifest import ManifestError, Utterance, parse_manifest_line
from streamssl.data.problems import CorpusError, Problem, check_transcript, report_skipped

logger = logging.getLogger(__name__)

TRANSCRIPT_SUFFIX = ".trans.txt"
_LIBRISPEECH_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")
# Frames read per block when fully decoding a file to look for corruption.
_DECODE_BLOCK_FRAMES = 1 << 18
# Layouts whose utterances keep the order of their file(s); the folder layouts are sorted by id.
MANIFEST_LAYOUTS = ("manifest", "lhotse", "shar")


@dataclass
class Scan:
    """What a reader found: good utterances, problems, and how many files were at each sample rate."""

    utterances: list[Utterance] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sample_rates: Counter = field(default_factory=Counter)
    layout: str = "folder"

    def ordered(self) -> list[Utterance]:
        """The good utterances in loading order: sorted by id for the folder layouts, file order for manifests."""
        return self.utterances if self.layout in MANIFEST_LAYOUTS else sorted(self.utterances, key=lambda utt: utt.id)

    def resample_note(self, sample_rate: int = SAMPLE_RATE) -> str | None:
        """A sentence about files not at ``sample_rate`` (they are resampled on load), or None if there are none."""
        other = {rate: count for rate, count in sorted(self.sample_rates.items()) if rate != sample_rate}
        if not other:
            return None
        rates = ", ".join(f"{count} file(s) at {rate} Hz" for rate, count in other.items())
        return f"{rates}; load_audio resamples them to {sample_rate} Hz with soxr"


def corpus_layout(src: str | Path) -> str:
    """``"manifest"`` for a ``.jsonl`` file, ``"lhotse"`` for a ``.jsonl.gz`` Lhotse cut manifest, ``"shar"``
    for a folder of Lhotse Shar shards, ``"librispeech"`` for a folder with ``*.trans.txt``, else ``"folder"``.

    Raises:
        ValueError: ``src`` does not exist, or is a file that is not a manifest.
    """
    src = Path(src)
    lhotse = cut_layout(src)
    if lhotse is not None:
        return lhotse
    if src.is_file():
        if src.suffix == ".jsonl":
            return "manifest"
        raise ValueError(f"{src}: expected a folder, a .jsonl manifest or a Lhotse {CUTS_SUFFIX} cut manifest")
    if not src.is_dir():
        raise ValueError(f"{src}: no such file or folder")
    return "librispeech" if next(src.rglob(f"*{TRANSCRIPT_SUFFIX}"), None) is not None else "folder"


def _decode_problem(path: Path, expected_frames: int) -> str | None:
    """Decode the whole file; describe what went wrong, or None if all ``expected_frames`` decoded."""
    decoded = 0
    try:
        with soundfile.SoundFile(str(path)) as audio:
            for block in audio.blocks(blocksize=_DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    return "decodes to non-finite samples"
                decoded += len(block)
    except (RuntimeError, OSError, soundfile.LibsndfileError) as error:
        return f"decoding failed after {decoded} of {expected_frames} frames: {error}"
    if decoded != expected_frames:
        return f"header says {expected_frames} frames but {decoded} decode (truncated or corrupt)"
    return None


def _check_audio(path: Path, scan: Scan, decode: bool) -> float | None:
    """Check one audio file; return its duration in seconds, or None after recording a problem."""
    if path.stat().st_size == 0:
        # What libsndfile writes for an empty FLAC; reading it would only say "format not recognised".
        scan.problems.append(Problem(str(path), "zero-length", "the file is empty (0 bytes)"))
        return None
    try:
        info = audio_info(path)
    except ValueError as error:
        scan.problems.append(Problem(str(path), "unreadable", str(error).removeprefix(f"{path}: ")))
        return None
    scan.sample_rates[info.sample_rate] += 1
    if info.frames == 0:
        scan.problems.append(Problem(str(path), "zero-length", "the file holds no audio samples"))
        return None
    if decode:
        message = _decode_problem(path, info.frames)
        if message is not None:
            scan.problems.append(Problem(str(path), "unreadable", message))
            return None
    return info.duration_s


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def _progress(items: list, desc: str, show: bool) -> list | tqdm:
    return tqdm(items, desc=desc, unit="file", disable=None) if show else items


def scan_librispeech(root: str | Path, decode: bool = False, progress: bool = False) -> Scan:
    """Read a LibriSpeech-layout tree: ``<root>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with
    ``<speaker>-<chapter>.trans.txt`` files of ``ID TEXT`` lines. ``root`` may be any subset folder (such as
    ``train-clean-100``) or a folder above several. Audio is looked up beside its transcript file.

    Args:
        decode: also decode every file in full to find corruption past the header (slow; the checker does it).
    """
    root = Path(root)
    scan = Scan()
    referenced: set[Path] = set()
    seen_ids: dict[str, str] = {}
    entries: list[tuple[str, Path, str, str]] = []
    for transcript in sorted(root.rglob(f"*{TRANSCRIPT_SUFFIX}")):
        try:
            lines = transcript.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            scan.problems.append(Problem(str(transcript), "malformed", f"cannot read transcript: {error}"))
            continue
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            utt_id, _, raw = line.strip().partition(" ")
            where = f"{transcript}:{number}"
            if not _LIBRISPEECH_ID.match(utt_id) or not raw.strip():
                scan.problems.append(Problem(where, "malformed", f"expected 'SPEAKER-CHAPTER-UTT TEXT', got {line!r}"))
                continue
            chapter_prefix = transcript.name.removesuffix(TRANSCRIPT_SUFFIX) + "-"
            if not utt_id.startswith(chapter_prefix):
                scan.problems.append(Problem(where, "malformed", f"{utt_id} does not belong in {transcript.name}"))
                continue
            if utt_id in seen_ids:
                scan.problems.append(Problem(where, "duplicate-id", f"{utt_id} already appears at {seen_ids[utt_id]}"))
                continue
            seen_ids[utt_id] = where
            audio = next((transcript.parent / f"{utt_id}{ext}" for ext in AUDIO_EXTENSIONS
                          if (transcript.parent / f"{utt_id}{ext}").is_file()), None)
            if audio is None:
                scan.problems.append(Problem(where, "missing-audio",
                                             f"{utt_id} has a transcript but no audio file {utt_id}.flac"))
                continue
            referenced.add(audio)
            entries.append((utt_id, audio, raw, where))
    for audio in _audio_files(root):
        if audio not in referenced:
            scan.problems.append(Problem(str(audio), "missing-transcript",
                                         f"no line for {audio.stem} in {audio.parent}/*{TRANSCRIPT_SUFFIX}"))
    for utt_id, audio, raw, where in _progress(entries, "checking audio", progress):
        duration_s = _check_audio(audio, scan, decode)
        text = check_transcript(raw, where, scan.problems)
        if duration_s is not None and text is not None:
            speaker = _LIBRISPEECH_ID.match(utt_id).group(1)
            scan.utterances.append(Utterance(utt_id, str(audio.resolve()), duration_s, text, speaker))
    return scan


def scan_folder(root: str | Path, decode: bool = False, progress: bool = False) -> Scan:
    """Read a folder of audio files, each with a same-named ``.txt`` transcript beside it (``a/b.flac`` +
    ``a/b.txt``). The id is the path below ``root`` without extension (``"a/b"``); the speaker is the first
    folder below ``root``, or ``"unknown"`` for files directly in it.
    """
    root = Path(root)
    scan = Scan()
    audio_files = _audio_files(root)
    stems = {audio.with_suffix("") for audio in audio_files}
    for transcript in sorted(root.rglob("*.txt")):
        if transcript.with_suffix("") not in stems:
            scan.problems.append(Problem(str(transcript), "missing-audio",
                                         f"transcript has no audio file {transcript.stem}.flac (or .wav, ...) beside it"))
    seen_stems: set[Path] = set()
    for audio in _progress(audio_files, "checking audio", progress):
        stem = audio.with_suffix("")
        transcript = stem.with_suffix(".txt")
        if stem in seen_stems:
            scan.problems.append(Problem(str(audio), "duplicate-id", f"another audio file is also named {stem.name}.*"))
            continue
        seen_stems.add(stem)
        if not transcript.is_file():
            scan.problems.append(Problem(str(audio), "missing-transcript", f"no transcript {transcript.name} beside it"))
            continue
        try:
            raw = transcript.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            scan.problems.append(Problem(str(transcript), "malformed", f"cannot read transcript: {error}"))
            continue
        duration_s = _check_audio(audio, scan, decode)
        text = check_transcript(raw, str(transcript), scan.problems)
        if duration_s is not None and text is not None:
            relative = stem.relative_to(root)
            speaker = relative.parts[0] if len(relative.parts) > 1 else "unknown"
            scan.utterances.append(Utterance(relative.as_posix(), str(audio.resolve()), duration_s, text, speaker))
    return scan


def scan_manifest(path: str | Path, decode: bool = False, progress: bool = False) -> Scan:
    """Read a JSONL manifest and check that each line parses and names an existing file with a usable transcript.

    Without ``decode`` the audio headers are not opened (the manifest's durations are trusted, and a zero duration
    is reported as zero-length audio), which keeps loading a large manifest fast; with it, every file is decoded.
    """
    path = Path(path)
    scan = Scan()
    base = path.resolve().parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        scan.problems.append(Problem(str(path), "malformed", f"cannot read manifest: {error}"))
        return scan
    seen_ids: dict[str, str] = {}
    for number, line in enumerate(_progress(lines, "checking audio", progress), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            utt = parse_manifest_line(line, where, base)
        except ManifestError as error:
            scan.problems.append(Problem(where, "malformed", str(error).removeprefix(f"{where}: ")))
            continue
        if utt.id in seen_ids:
            scan.problems.append(Problem(where, "duplicate-id", f"{utt.id} already appears at {seen_ids[utt.id]}"))
            continue
        seen_ids[utt.id] = where
        audio = Path(utt.audio)
        if not audio.is_file():
            scan.problems.append(Problem(where, "missing-audio", f"{utt.id}: audio file {audio} does not exist"))
            continue
        if decode:
            duration_s = _check_audio(audio, scan, decode=True)
        elif utt.duration == 0:
            scan.problems.append(Problem(str(audio), "zero-length", f"{utt.id}: manifest duration is 0"))
            duration_s = None
        else:
            duration_s = utt.duration
        text = check_transcript(utt.text, where, scan.problems)
        if duration_s is not None and text is not None:
            scan.utterances.append(Utterance(utt.id, utt.audio, duration_s, text, utt.speaker))
    return scan


def scan_corpus(src: str | Path, decode: bool = False, progress: bool = False, keep_audio: bool = True) -> Scan:
    """Read ``src`` with the reader for its layout (see :func:`corpus_layout`). ``keep_audio``: a Lhotse Shar
    folder's utterances hold their audio (see :func:`streamssl.data.lhotse.scan_cuts`); a check that only
    counts them passes False."""
    layout = corpus_layout(src)
    if layout in ("lhotse", "shar"):
        scan = Scan(*scan_cuts(src, decode=decode, progress=progress, keep_audio=keep_audio))
    else:
        reader = {"manifest": scan_manifest, "librispeech": scan_librispeech, "folder": scan_folder}[layout]
        scan = reader(src, decode=decode, progress=progress)
    scan.layout = layout
    return scan


def load_utterances(src: str | Path, skip_bad: bool = False, decode: bool = False) -> list[Utterance]:
    """Load the utterances of a LibriSpeech-layout folder, a folder of audio + ``.txt``, a ``.jsonl`` manifest,
    or a Lhotse cut manifest or Shar folder (whose utterances load their audio through Lhotse).

    Without ``decode``, audio headers are read (not decoded) for the folder layouts and a manifest's
    durations are trusted; with it every file is decoded in full, so the result leaves out exactly what
    ``check_corpus`` reports (truncated audio behind a valid header too).
    Utterances come sorted by id for the folder layouts, in file order for manifests.

    Args:
        skip_bad: if True, return the good utterances and log a warning listing every skipped problem.
        decode: decode every file in full (slow, finds everything the checker finds).

    Raises:
        CorpusError: the corpus has problems and ``skip_bad`` is False; the error lists all of them.
        ValueError: ``src`` does not exist or is not a known layout.
    """
    scan = scan_corpus(src, decode=decode)
    if scan.problems and not skip_bad:
        raise CorpusError(scan.problems, source=str(src))
    report_skipped(scan.problems, str(src))
    note = scan.resample_note()
    if note:
        logger.warning("%s: %s", src, note)
    if not scan.utterances:
        raise ValueError(f"{src}: no usable utterances found")
    return scan.ordered()
