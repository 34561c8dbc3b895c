"""Corpus validation: every problem of a corpus, each naming its file."""

from __future__ import annotations

from pathlib import Path

from streamssl.data.problems import Problem
from streamssl.data.readers import Scan, scan_corpus


def check_corpus(src: str | Path, decode: bool = True, progress: bool = False) -> list[Problem]:
    """List every problem of a corpus (any layout :func:`streamssl.data.load_utterances` reads, Lhotse cuts and Shar shards too).

    Finds unreadable or corrupt audio, zero-length audio, audio without a transcript, transcripts (or manifest
    lines) without audio, transcripts with unsupported characters or empty once normalised, malformed lines and
    duplicate ids. With ``decode`` (the default) every audio file is decoded in full, so corruption past a valid
    header is found too.
    """
    return scan_corpus(src, decode=decode, progress=progress, keep_audio=False).problems


def check_report(src: str | Path, decode: bool = True, progress: bool = False) -> tuple[Scan, list[str]]:
    """Run the checker and return the scan with printable lines: the problems, a resampling note, a summary."""
    scan = scan_corpus(src, decode=decode, progress=progress, keep_audio=False)
    lines = [str(problem) for problem in scan.problems]
    note = scan.resample_note()
    if note:
        lines.append(f"note: {note}")
    hours = sum(utt.duration for utt in scan.utterances) / 3600
    lines.append(f"{src}: {len(scan.utterances)} good utterance(s), {hours:.3f} h; {len(scan.problems)} problem(s)")
    return scan, lines
