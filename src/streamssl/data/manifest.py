"""Utterance records and the JSONL manifest format (one JSON object per line)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamssl.data.audio import SAMPLE_RATE, load_audio

MANIFEST_FIELDS = ("id", "audio", "duration", "text", "speaker")


@dataclass(frozen=True)
class Utterance:
    """One spoken utterance.

    Attributes:
        id: unique identifier, e.g. ``"103-1240-0000"``.
        audio: path of the audio file (absolute once read from a manifest).
        duration: length in seconds, from the file header at its own sample rate.
        text: transcript in the LibriSpeech normal form (see :func:`streamssl.data.normalize_text`).
        speaker: speaker identifier.
    """

    id: str
    audio: str
    duration: float
    text: str
    speaker: str

    def read_audio(self, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """The utterance's samples, float32 mono of shape (S,) at ``sample_rate`` Hz (see
        :func:`streamssl.data.load_audio`); ``ValueError`` naming the file if it cannot be decoded."""
        return load_audio(self.audio, sample_rate)


class ManifestError(ValueError):
    """A manifest line that is not a valid utterance record; the message names the file and line."""


def parse_manifest_line(line: str, where: str, base: Path) -> Utterance:
    """Parse one JSONL line; ``where`` (``"file:line"``) names it in errors, relative audio resolves to ``base``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where}: not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [field for field in MANIFEST_FIELDS if field not in record]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    duration = record["duration"]
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0:
        raise ManifestError(f"{where}: duration must be a non-negative number of seconds, got {duration!r}")
    for field in ("id", "audio", "text", "speaker"):
        if not isinstance(record[field], str):
            raise ManifestError(f"{where}: {field} must be a string, got {record[field]!r}")
    audio = Path(record["audio"])
    return Utterance(id=record["id"], audio=str(audio if audio.is_absolute() else base / audio),
                     duration=float(duration), text=record["text"], speaker=record["speaker"])


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest with fields ``id, audio, duration, text, speaker``.

    Relative ``audio`` paths resolve against the manifest's folder. Blank lines are ignored. This only parses;
    :func:`streamssl.data.load_utterances` also checks the files and transcripts.

    Raises:
        ValueError: the manifest cannot be read, or a line is malformed (the error names file and line).
    """
    path = Path(path)
    base = path.resolve().parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read manifest: {error}") from None
    return [parse_manifest_line(line, f"{path}:{number}", base)
            for number, line in enumerate(lines, start=1) if line.strip()]


def write_manifest(utterances: list[Utterance], path: str | Path) -> None:
    """Write ``utterances`` as JSONL, one per line in the given order.

    Audio paths below the manifest's folder are written relative to it (so a corpus folder can be moved as a
    whole); others are written absolute.
    """
    path = Path(path)
    base = path.resolve().parent
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for utt in utterances:
            audio = Path(utt.audio).resolve()
            record = {name: getattr(utt, name) for name in MANIFEST_FIELDS}
            record["audio"] = (os.path.relpath(audio, base) if audio.is_relative_to(base) else str(audio))
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
