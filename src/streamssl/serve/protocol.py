"""The wire protocol of ``streamssl serve`` (docs/serving.md): the start message, audio frames, and the
JSON messages the server sends. Pure functions, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamssl.asr.lexicon import parse_hotwords
from streamssl.streaming.engine import Token, Word

FORMATS = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
# A start message's hotwords: at most this many phrases of at most this many characters.
MAX_HOTWORDS = 200
MAX_HOTWORD_CHARS = 100

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


class ProtocolError(ValueError):
    """A client broke the protocol; ``close_code`` is what the connection is closed with."""

    def __init__(self, message: str, close_code: int = CLOSE_POLICY):
        super().__init__(message)
        self.close_code = close_code


@dataclass(frozen=True)
class StartMessage:
    """``sample_rate`` in Hz of the audio the client will send, ``sample_format`` one of :data:`FORMATS`,
    ``hotwords`` the phrases this stream's beam search favours (normalised words)."""

    sample_rate: int
    sample_format: str
    hotwords: tuple[tuple[str, ...], ...] = ()


def parse_start(message: str | bytes) -> StartMessage:
    """The first message of a session: ``{"type": "start", "sample_rate": 48000, "format": "pcm16"}``,
    optionally with ``"hotwords": ["phrase", ...]``."""
    if isinstance(message, bytes):
        raise ProtocolError("expected a JSON start message first, got binary data; send "
                            '{"type": "start", "sample_rate": <Hz>, "format": "pcm16"|"float32"}', CLOSE_UNSUPPORTED)
    try:
        data = json.loads(message)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"start message is not JSON ({error}): {message[:80]!r}") from None
    if not isinstance(data, dict) or data.get("type") != "start":
        raise ProtocolError(f'the first message must be an object with "type": "start", got {message[:80]!r}')
    unknown = sorted(set(data) - {"type", "sample_rate", "format", "hotwords"})
    if unknown:
        raise ProtocolError(f"unknown field(s) in start message: {', '.join(unknown)}")
    rate = data.get("sample_rate")
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(f"sample_rate must be an integer number of Hz in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}], "
                            f"got {rate!r}")
    sample_format = data.get("format", "pcm16")
    if sample_format not in FORMATS:
        raise ProtocolError(f"format must be one of {sorted(FORMATS)}, got {sample_format!r}")
    return StartMessage(rate, sample_format, _hotwords(data.get("hotwords", [])))


def _hotwords(value: Any) -> tuple[tuple[str, ...], ...]:
    """The start message's ``hotwords``: a list of phrases (strings), normalised like transcripts."""
    if not isinstance(value, list) or not all(isinstance(phrase, str) for phrase in value):
        raise ProtocolError(f"hotwords must be a list of strings (phrases), got {json.dumps(value)[:80]}")
    if len(value) > MAX_HOTWORDS:
        raise ProtocolError(f"at most {MAX_HOTWORDS} hotwords, got {len(value)}")
    for phrase in value:
        if len(phrase) > MAX_HOTWORD_CHARS:
            raise ProtocolError(f"a hotword phrase has at most {MAX_HOTWORD_CHARS} characters, got {phrase[:40]!r}...")
    try:
        return parse_hotwords(phrase.replace("\n", " ") for phrase in value)
    except ValueError as error:
        raise ProtocolError(f"hotwords: {error}") from None


def decode_audio(payload: bytes, sample_format: str) -> np.ndarray:
    """A binary audio message as float32 samples in [-1, 1] (little-endian PCM16, or float32)."""
    dtype = FORMATS[sample_format]
    if len(payload) % dtype.itemsize:
        raise ProtocolError(f"{sample_format} audio message of {len(payload)} bytes is not a whole number of "
                            f"{dtype.itemsize}-byte samples", CLOSE_UNSUPPORTED)
    samples = np.frombuffer(payload, dtype=dtype)
    if sample_format == "pcm16":
        return samples.astype(np.float32) / 32768.0
    if not np.isfinite(samples).all():
        raise ProtocolError("float32 audio contains NaN or infinite values", CLOSE_UNSUPPORTED)
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > 1.0:
        raise ProtocolError(f"float32 audio must lie in [-1, 1], got a sample of magnitude {peak:.4g}",
                            CLOSE_UNSUPPORTED)
    return samples.astype(np.float32, copy=True)


def parse_control(message: str) -> str:
    """A text message after the start: only ``{"type": "stop"}`` (flush and finish) is defined."""
    try:
        data = json.loads(message)
    except json.JSONDecodeError:
        raise ProtocolError(f"text message is not JSON: {message[:80]!r}") from None
    if not isinstance(data, dict) or data.get("type") != "stop":
        raise ProtocolError(f'after the start message only audio (binary) and {{"type": "stop"}} are accepted, '
                            f"got {message[:80]!r}")
    return "stop"


def token_json(token: Token, delay_ms: float) -> dict[str, Any]:
    return {"text": token.text, "frame": token.frame, "start_s": round(token.start_s, 4),
            "end_s": round(token.end_s, 4), "delay_ms": round(delay_ms, 2)}


def word_json(word: Word, delay_ms: float) -> dict[str, Any]:
    confidence = None if word.confidence is None else round(word.confidence, 4)
    return {"text": word.text, "start_s": round(word.start_s, 4), "end_s": round(word.end_s, 4),
            "delay_ms": round(delay_ms, 2), "confidence": confidence}


def error_json(message: str) -> str:
    return json.dumps({"type": "error", "message": message})
