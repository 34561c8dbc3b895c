"""Audio files: header inspection, decoding to float32 mono, and resampling with soxr."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Extensions the readers treat as audio; soundfile (libsndfile) decodes all of them.
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif")

_rates_noticed: set[int] = set()


@dataclass(frozen=True)
class AudioInfo:
    """What an audio file's header says: ``frames`` per channel at ``sample_rate`` Hz."""

    frames: int
    sample_rate: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def audio_info(path: str | Path) -> AudioInfo:
    """Read an audio file's header without decoding it.

    Raises:
        ValueError: the file is missing, unreadable or not an audio format libsndfile knows; the message
            names the file.
    """
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{path}: cannot read audio header: {error}") from None
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate), channels=int(info.channels))


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample float32 ``audio`` of shape (S,) from ``from_rate`` to ``to_rate`` Hz with soxr (high quality)."""
    if from_rate == to_rate:
        return audio
    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to float32 mono at ``sample_rate`` Hz.

    Returns:
        Array of shape (S,), values in [-1, 1] for PCM sources. Multi-channel audio is averaged to mono.
        Audio at another rate is resampled with soxr; the first file of each foreign rate is logged
        (a warning), so the conversion is never silent but does not flood the log.

    Raises:
        ValueError: the file cannot be decoded (missing, corrupt, truncated); the message names the file.
    """
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{path}: cannot decode audio: {error}") from None
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate and file_rate not in _rates_noticed:
        _rates_noticed.add(file_rate)
        logger.warning("resampling %d Hz audio to %d Hz with soxr (first such file: %s)", file_rate, sample_rate,
                       path)
    return np.ascontiguousarray(resample(mono, file_rate, sample_rate), dtype=np.float32)
