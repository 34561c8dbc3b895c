"""Plain-text tables the commands print: declared latencies and evaluation results."""

from __future__ import annotations

from typing import Any

from streamssl.latency import Latency


def format_ms(value: float | None) -> str:
    """``None`` (unbounded look-ahead) reads "whole utterance"; a second or more is shown in seconds."""
    return "whole utterance" if value is None else f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def text_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def latency_table(latencies: list[Latency]) -> str:
    """One line per declared :class:`~streamssl.latency.Latency`."""
    rows = [("mixer", "layers", "encoder look-ahead", "frames", "mean", "frontend", "total", "streams")]
    for lat in latencies:
        frames = "-" if lat.encoder_lookahead_frames is None else str(lat.encoder_lookahead_frames)
        rows.append((lat.mixer, str(lat.n_layers), format_ms(lat.encoder_lookahead_ms), frames,
                     format_ms(lat.encoder_mean_lookahead_ms), format_ms(lat.frontend_lookahead_ms),
                     format_ms(lat.total_lookahead_ms), "yes" if lat.streamable else "no"))
    return text_table(rows)


def results_table(rows: list[tuple[str, Any]]) -> str:
    """One line per (label, :class:`~streamssl.asr.evaluate.EvalResult`). ``look-ahead`` is the model's declared
    look-ahead; ``algorithmic`` adds the wait for a chunk to fill (what ``stream`` and ``serve`` declare), for
    streaming rows only."""
    table = [("model", "mode", "decoder", "look-ahead", "algorithmic", "WER %", "CER %", "RTF", "utterances")]
    for label, r in rows:
        mode = f"streaming {r.chunk_ms:g} ms" if r.streaming else "offline"
        algorithmic = "-" if r.algorithmic_latency_ms is None else format_ms(r.algorithmic_latency_ms)
        table.append((label, mode, r.decoder, format_ms(r.latency["total_lookahead_ms"]), algorithmic,
                      f"{100 * r.wer:.1f}", f"{100 * r.cer:.1f}", f"{r.rtf:.3f}", str(r.n_utterances)))
    return text_table(table)
