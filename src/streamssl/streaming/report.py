"""Latency report of a streaming run (docs/methods.md section 5): declared, compute, and emission delay."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from streamssl.streaming.recognizer import Recognizer, Stream


def _stats_ms(values_s: list[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, median and 95th percentile in milliseconds (``None`` when there is nothing to count)."""
    if not values_s:
        return None, None, None
    ms = 1000 * np.asarray(values_s)
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


@dataclass
class LatencyReport:
    """Latency three ways for one or more finished streams.

    Declared: ``lookahead_ms`` (frontend + encoder) plus ``chunk_ms`` of waiting for a chunk to fill is
    ``algorithmic_ms``. Compute: wall time per model call (``compute_*_ms``), and the real-time factor
    ``rtf`` (all compute, flush included, over the audio duration; ``rtf_cpu`` counts process CPU time
    instead, which is what a core of one's own would give on a busy machine). Emission delay: per word
    (its last character) and per token, from feeding the audio that completes the frame to emitting it.
    """

    pace: str
    chunk_ms: float | None
    frontend_lookahead_ms: float
    encoder_lookahead_ms: float
    lookahead_ms: float
    algorithmic_ms: float
    audio_s: float
    chunks: int
    compute_mean_ms: float | None
    compute_p50_ms: float | None
    compute_p95_ms: float | None
    rtf: float
    rtf_cpu: float
    words: int
    word_delay_mean_ms: float | None
    word_delay_p95_ms: float | None
    tokens: int
    token_delay_mean_ms: float | None
    token_delay_p95_ms: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Plain-text report, one quantity a line."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        chunk = "as fed" if self.chunk_ms is None else f"{self.chunk_ms:g} ms"
        lines = [
            f"latency report ({self.audio_s:.2f} s of audio, {self.chunks} model calls, pace: {self.pace})",
            f"  declared algorithmic latency  {ms(self.algorithmic_ms)}  = look-ahead {ms(self.lookahead_ms)} "
            f"(frontend {ms(self.frontend_lookahead_ms)} + encoder {ms(self.encoder_lookahead_ms)}) "
            f"+ chunk wait {chunk}",
            f"  compute per chunk             mean {ms(self.compute_mean_ms)}, p50 {ms(self.compute_p50_ms)}, "
            f"p95 {ms(self.compute_p95_ms)}",
            f"  real-time factor              {self.rtf:.3f} (CPU time: {self.rtf_cpu:.3f})",
            f"  emission delay per word       mean {ms(self.word_delay_mean_ms)}, p95 {ms(self.word_delay_p95_ms)} "
            f"({self.words} words)",
            f"  emission delay per token      mean {ms(self.token_delay_mean_ms)}, "
            f"p95 {ms(self.token_delay_p95_ms)} ({self.tokens} tokens)",
        ]
        return "\n".join(lines)


def build_report(recognizer: Recognizer, streams: list[Stream], pace: str) -> LatencyReport:
    """Summarise finished ``streams`` of ``recognizer``; ``pace`` says how audio was fed (for the reader)."""
    latency = recognizer.latency()
    encoder_ms = latency.encoder_lookahead_ms
    if encoder_ms is None:
        raise ValueError("the encoder looks at the whole utterance; it has no streaming latency")
    lookahead_ms = latency.frontend_lookahead_ms + encoder_ms
    compute = [t for s in streams for t in s.compute_s]
    cpu = [t for s in streams for t in s.cpu_s]
    audio_s = sum(s.samples_in for s in streams) / recognizer.sample_rate
    total_s = sum(compute) + sum(s.flush_s for s in streams)
    total_cpu_s = sum(cpu) + sum(s.flush_cpu_s for s in streams)
    word_delays = [w.delay_s for s in streams for w in s.words]
    token_delays = [t.delay_s for s in streams for t in s.tokens]
    compute_mean, compute_p50, compute_p95 = _stats_ms(compute)
    word_mean, _, word_p95 = _stats_ms(word_delays)
    token_mean, _, token_p95 = _stats_ms(token_delays)
    return LatencyReport(
        pace=pace, chunk_ms=recognizer.chunk_ms, frontend_lookahead_ms=latency.frontend_lookahead_ms,
        encoder_lookahead_ms=encoder_ms, lookahead_ms=lookahead_ms,
        algorithmic_ms=lookahead_ms + (recognizer.chunk_ms or 0.0), audio_s=audio_s, chunks=len(compute),
        compute_mean_ms=compute_mean, compute_p50_ms=compute_p50, compute_p95_ms=compute_p95,
        rtf=total_s / audio_s if audio_s else 0.0, rtf_cpu=total_cpu_s / audio_s if audio_s else 0.0,
        words=len(word_delays), word_delay_mean_ms=word_mean, word_delay_p95_ms=word_p95,
        tokens=len(token_delays), token_delay_mean_ms=token_mean, token_delay_p95_ms=token_p95)
