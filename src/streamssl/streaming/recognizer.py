"""The streaming CTC recogniser: live audio in, tokens and words with times out, for any number of streams.

Usage::

    recognizer = Recognizer.from_checkpoint("runs/demo/finetune", chunk_ms=40)
    stream = recognizer.stream()
    for samples in microphone():               # any number of 16 kHz samples at a time
        update = stream.accept(samples)        # tokens and completed words emitted now, with times
        print(update.partial)
    transcript = stream.finish()               # flush the look-ahead; transcript.text is final

    # several streams in one model call:
    updates = recognizer.accept({stream_a: samples_a, stream_b: samples_b})

A :class:`Recognizer` is the batched streaming core (:class:`~streamssl.streaming.engine.StreamingEngine`:
batching, decoding, words, emission delay) with what live audio needs on top: checks of the samples, a
checkpoint loader, and the ONNX Runtime backend (:meth:`Recognizer.from_export`: an exported file, run
without PyTorch). Emission delay (docs/methods.md section 5.3) runs from the
clock reading of the :meth:`Stream.accept` call that completed a frame's window to the clock reading once its
tokens were decoded: waiting for a chunk to fill, for look-ahead audio, and compute are all inside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from streamssl.data.audio import MAX_FLOAT_PEAK
from streamssl.latency import Latency
from streamssl.runtime.model import OnnxModel
from streamssl.streaming.engine import (
    Clock,
    Stream,
    StreamDecoder,
    StreamingEngine,
    Token,
    Transcript,
    Update,
    Word,
)

if TYPE_CHECKING:
    from streamssl.asr.ctc import RecognitionModel

__all__ = ["BACKENDS", "Recognizer", "Stream", "Token", "Transcript", "Update", "Word"]

BACKENDS = ("torch", "onnx")
# Audio one stream gives one call at most: a stream that brought seconds at once is worked off over
# several calls, so the streams sharing them do not wait for it.
MAX_TICK_S = 1.0


def _as_samples(samples: Any) -> np.ndarray:
    """A 1-D float numpy array, or ``ValueError`` saying what is wrong with ``samples``. A torch tensor is
    read on the CPU (without a copy there), without importing torch here."""
    if hasattr(samples, "detach") and hasattr(samples, "numpy"):
        if not samples.is_floating_point():
            raise ValueError(f"samples must be floating point in [-1, 1], got dtype {samples.dtype}; "
                             "convert integer PCM with x / 32768")
        samples = samples.detach().cpu()
        samples = (samples if str(samples.dtype) in ("torch.float32", "torch.float64") else samples.float()).numpy()
    if not isinstance(samples, np.ndarray):
        raise ValueError(f"samples must be a 1-D numpy array or torch tensor, got {type(samples).__name__}")
    if samples.ndim != 1:
        raise ValueError(f"samples must be 1-D (mono), got shape {tuple(samples.shape)}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"samples must be floating point in [-1, 1], got dtype {samples.dtype}; "
                         "convert integer PCM with x / 32768")
    if not np.isfinite(samples).all():
        raise ValueError("samples contain NaN or infinite values")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > MAX_FLOAT_PEAK:
        raise ValueError(f"samples must be floats in [-1, 1], got a peak magnitude of {peak:g}; integer PCM "
                         "values stored as floats (int16 range) need dividing by 32768")
    return samples


class Recognizer(StreamingEngine):
    """Streaming CTC recognition of 16 kHz audio with a :class:`~streamssl.asr.ctc.RecognitionModel`.

    Args:
        model: a CTC model (:class:`~streamssl.asr.ctc.CTCModel`) that streams and reads a waveform; it is
            put in eval mode.
        chunk_ms: model step size. ``None`` steps on whatever each ``accept`` brings; a number buffers
            audio and steps in whole chunks of this many milliseconds (the rest waits for more audio
            or :meth:`Stream.finish`). Transcripts never depend on it; latency and speed do.
        clock: seconds, monotonic; emission delays are differences of its readings. A paced or
            simulated clock (see :mod:`streamssl.streaming.pacing`) can be passed in.
        backend: ``"torch"``, or ``"onnx"``: the model's step exported at ``chunk_ms``
            (:func:`streamssl.export.export_model`) and run by ONNX Runtime on one thread; an
            :class:`~streamssl.runtime.model.OnnxModel` may also be passed as ``model`` (with either
            backend: it is ONNX Runtime's), and needs no PyTorch.
        decoder: a factory of one stream's decoder (:func:`~streamssl.streaming.engine.decoder_factory`:
            greedy CTC, the default, or the lexicon beam search with a word LM); with a beam search, each
            update's partial is its best hypothesis with the stable words marked (``update.stable``,
            ``update.unstable``), and a word is emitted when it becomes stable.
    """

    def __init__(self, model: RecognitionModel | OnnxModel, chunk_ms: float | None = None, clock: Clock = time.perf_counter,
                 backend: str = "torch", decoder: Callable[..., StreamDecoder] | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if chunk_ms is not None and not (chunk_ms > 0 and chunk_ms < float("inf")):
            raise ValueError(f"chunk_ms must be a positive number of milliseconds, got {chunk_ms}")
        if backend == "onnx" and not isinstance(model, OnnxModel):
            if chunk_ms is None:
                raise ValueError("backend='onnx' runs an export at a fixed chunk size; give chunk_ms")
            from streamssl.export import export_model

            model = OnnxModel(export_model(model, chunk_ms)[0])
        error = model.stream_error()
        if error is not None:
            raise ValueError(error)
        if model.hop_samples is None or model.window_samples is None:
            raise ValueError("the recogniser takes waveform input; this model's encoder has frontend='none'")
        chunk_samples = None if chunk_ms is None else max(1, round(chunk_ms * model.sample_rate / 1000))
        # An export steps a fixed chunk; the PyTorch model takes any number of samples per call.
        limit = model.info.chunk_samples if isinstance(model, OnnxModel) else round(MAX_TICK_S * model.sample_rate)
        if chunk_samples is not None and not isinstance(model, OnnxModel):
            limit = max(chunk_samples, limit - limit % chunk_samples)
        super().__init__(model.eval(), decoder, chunk_samples, limit, clock)
        self.chunk_ms = chunk_ms

    @classmethod
    def from_checkpoint(cls, path: str | Path, chunk_ms: float | None = None, clock: Clock = time.perf_counter,
                        backend: str = "torch", decoder: Callable[..., StreamDecoder] | None = None) -> "Recognizer":
        """Load a fine-tuned CTC checkpoint (file or run folder) made by ``streamssl finetune``; an ONNX
        export is refused with a pointer to :meth:`from_export`."""
        if Path(path).suffix == ".onnx":
            raise ValueError(f"{path} is an ONNX export, not a checkpoint: load it with Recognizer.from_export "
                             "(on the command line: --model)")
        from streamssl.train.checkpoint import load_checkpoint

        return cls(load_checkpoint(path, kind="finetune").model, chunk_ms, clock, backend, decoder)

    @classmethod
    def from_export(cls, path: str | Path | bytes, chunk_ms: float | None = None, threads: int = 1,
                    clock: Clock = time.perf_counter,
                    decoder: Callable[..., StreamDecoder] | None = None) -> "Recognizer":
        """Load a file written by ``streamssl export`` and run it in ONNX Runtime on ``threads`` threads,
        without PyTorch. ``chunk_ms`` defaults to the export's chunk (any other steps its chunks in
        several calls or partial ones; transcripts do not change)."""
        model = OnnxModel(path, threads=threads)
        return cls(model, model.info.chunk_ms if chunk_ms is None else chunk_ms, clock, "onnx", decoder)

    def latency(self) -> Latency:
        """The model's declared look-ahead (the chunk wait is :attr:`chunk_ms` on top)."""
        return self.model.latency()

    def stream(self, sample_rate: int | None = None, arrival_rate: int | None = None,
               hotwords: Sequence[Sequence[str]] = ()) -> Stream:
        """A new, independent stream. ``sample_rate``: the rate of the audio it will be fed, if the caller
        knows it; a rate other than the model's is refused (resample first, e.g. with
        ``streamssl.data.audio.resample``), because audio read at the wrong rate is still valid-looking
        samples and would be transcribed as garbage.

        ``arrival_rate``: for audio resampled on its way in, the rate of the source whose arrival the
        caller records itself (``stream.arrivals.record(source_samples_so_far, recognizer.clock())``);
        ``accept`` then records no arrivals, and emission delays count from the source audio.

        ``hotwords``: phrases (tuples of upper-case words, :func:`~streamssl.asr.lexicon.parse_hotwords`)
        this stream's lexicon beam search favours; a greedy recogniser refuses them."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"sample_rate {sample_rate} Hz: this model takes {self.sample_rate} Hz audio; "
                             "resample it first (streamssl.data.audio.resample)")
        return super().stream(None if arrival_rate is None else arrival_rate / self.sample_rate, hotwords)

    def accept(self, feeds: Mapping[Stream, Any]) -> dict[Stream, Update]:
        """Give samples to several streams at once and advance them in as few model calls as possible.

        ``feeds`` maps each stream to a 1-D float array/tensor of 16 kHz samples in [-1, 1] (any length).
        Every feed is checked before any is buffered, so a bad one leaves all streams as they were.
        """
        checked = {}
        for stream, samples in feeds.items():
            if stream.engine is not self:
                raise ValueError("a stream of another Recognizer was passed to accept")
            if stream.finished:
                raise ValueError("stream already finished; start a new one with recognizer.stream()")
            checked[stream] = _as_samples(samples)
        return super().accept(checked)
