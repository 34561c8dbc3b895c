"""Audio files: header inspection, decoding to float32 mono, and resampling with soxr."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Extensions the readers treat as audio; soundfile (libsndfile) decodes all of them.
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif")

# Float PCM lies in [-1, 1]; the headroom lets resampled or filtered audio overshoot a little (the
# recogniser allows the same), while louder files are refused before they are transcribed as noise.
MAX_FLOAT_PEAK = 1.5

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


def _existing_file(path: str | Path) -> str:
    """``path`` as a string, or a ``ValueError`` naming it if it is missing or a folder (libsndfile would
    only say "System error.")."""
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a folder, not an audio file")
    if not Path(path).exists():
        raise ValueError(f"{path}: no such file")
    return str(path)


def audio_info(path: str | Path) -> AudioInfo:
    """Read an audio file's header without decoding it.

    Raises:
        ValueError: the file is missing, a folder, unreadable or not an audio format libsndfile knows; the
            message names the file.
    """
    try:
        info = soundfile.info(_existing_file(path))
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{path}: cannot read audio header: {error}") from None
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate), channels=int(info.channels))


def check_samples(path: str | Path, samples: np.ndarray, sample_rate: int, start_frame: int = 0) -> None:
    """Refuse decoded ``samples`` of shape (frames, channels) at ``sample_rate`` Hz, ``start_frame``
    frames into ``path``, that are not audio in [-1, 1]: NaN or infinite values, or a peak above
    :data:`MAX_FLOAT_PEAK`. Says whether the values look like int16 PCM stored as floats.

    Raises:
        ValueError: naming ``path`` and the time (seconds) of the first bad value or of the peak.
    """
    if samples.size == 0:
        return
    finite = np.isfinite(samples).all(axis=1)
    if not finite.all():
        at = (start_frame + int(np.argmin(finite))) / sample_rate
        raise ValueError(f"{path}: samples are NaN or infinite (the first at {at:.3f} s)")
    magnitude = np.abs(samples).max(axis=1)
    peak_frame = int(np.argmax(magnitude))
    peak = float(magnitude[peak_frame])
    if peak > MAX_FLOAT_PEAK:
        at = (start_frame + peak_frame) / sample_rate
        # Whole numbers are what int16 PCM becomes when written as floats without scaling.
        if peak <= 32768 and bool(np.all(samples == np.round(samples))):
            hint = "the values are whole numbers, as int16 PCM stored as floats: divide them by 32768"
        else:
            hint = "scale the audio into [-1, 1], e.g. divide it by its peak"
        raise ValueError(f"{path}: float samples exceed [-1, 1] (peak {round(peak, 3)} at {at:.3f} s); {hint}")


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
        data, file_rate = soundfile.read(_existing_file(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{path}: cannot decode audio: {error}") from None
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate and file_rate not in _rates_noticed:
        _rates_noticed.add(file_rate)
        logger.warning("resampling %d Hz audio to %d Hz with soxr (first such file: %s)", file_rate, sample_rate,
                       path)
    return np.ascontiguousarray(resample(mono, file_rate, sample_rate), dtype=np.float32)


def audio_blocks(path: str | Path, sample_rate: int = SAMPLE_RATE, block_frames: int = 16384) -> Iterator[np.ndarray]:
    """Decode an audio file block by block to float32 mono at ``sample_rate`` Hz.

    Reads ``block_frames`` frames (at the file's own rate, all channels) at a time with soundfile,
    averages them to mono and resamples them on the fly with soxr's streaming resampler, so memory stays
    that of one block whatever the file's length. Yields arrays of shape (S_i,) (some may be empty while
    the resampler fills its filter); joined, they are the whole file, as :func:`load_audio` gives it up
    to the resampler's streaming form (identical when no resampling is needed). Unlike
    :func:`load_audio`, this logs nothing: callers say themselves when they resample.

    Raises:
        ValueError: the file cannot be opened, decoding fails or ends early, or a block is not audio in
            [-1, 1] (:func:`check_samples`), after the blocks before that were yielded; the message names
            the file.
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be positive, got {block_frames}")
    try:
        audio = soundfile.SoundFile(_existing_file(path))
    except (RuntimeError, OSError) as error:
        raise ValueError(f"{path}: cannot decode audio: {error}") from None
    with audio:
        resampler = (None if audio.samplerate == sample_rate else
                     soxr.ResampleStream(audio.samplerate, sample_rate, 1, dtype="float32", quality="HQ"))
        decoded = 0
        while True:
            try:
                block = audio.read(block_frames, dtype="float32", always_2d=True)
            except (RuntimeError, OSError) as error:
                raise ValueError(f"{path}: decoding failed after {decoded} frames: {error}") from None
            check_samples(path, block, audio.samplerate, decoded)
            decoded += block.shape[0]
            last = block.shape[0] < block_frames
            mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            mono = np.ascontiguousarray(mono, dtype=np.float32)
            yield mono if resampler is None else resampler.resample_chunk(mono, last=last)
            if last:
                break
    if decoded != audio.frames:
        raise ValueError(f"{path}: header says {audio.frames} frames but {decoded} decode (truncated or corrupt)")
