"""A tiny corpus for the training tests: each character is a tone of its own pitch, so the audio
carries its transcript and CTC can learn it in a few steps."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = ["CAT", "DOG", "SUN", "TREE", "BLUE", "RED", "IT'S", "A", "GO", "ON"]
RATE = 16000
CHAR_SECONDS = 0.06


def tone_audio(text: str, rng: np.random.Generator) -> np.ndarray:
    pieces = []
    for char in text:
        n = int(CHAR_SECONDS * RATE)
        if char == " ":
            pieces.append(np.zeros(n))
            continue
        freq = 200.0 + 60.0 * (string.ascii_uppercase + "'").index(char)
        t = np.arange(n) / RATE
        pieces.append(0.3 * np.sin(2 * np.pi * freq * t))
    audio = np.concatenate([np.zeros(800), *pieces, np.zeros(800)])
    return (audio + 0.01 * rng.standard_normal(audio.shape[0])).astype(np.float32)


def make_corpus(folder: Path, n: int = 12, seed: int = 0, words: tuple[int, int] = (2, 4)) -> Path:
    """Write ``n`` utterances as WAV files and a ``manifest.jsonl``; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(words[0], words[1] + 1))))
        audio = tone_audio(text, rng)
        path = folder / f"utt{i:03d}.wav"
        sf.write(path, audio, RATE, subtype="PCM_16")
        lines.append(json.dumps({"id": f"s{i % 3}-utt{i:03d}", "audio": str(path), "duration": len(audio) / RATE,
                                 "text": text, "speaker": f"s{i % 3}"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
