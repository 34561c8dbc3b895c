"""A streaming CTC recogniser: many independent streams, batched through the model's ``step``.

Usage::

    recognizer = Recognizer.from_checkpoint("runs/demo/finetune", chunk_ms=40)
    stream = recognizer.stream()
    for samples in microphone():               # any number of 16 kHz samples at a time
        update = stream.accept(samples)        # tokens and completed words emitted now, with times
        print(update.partial)
    transcript = stream.finish()               # flush the look-ahead; transcript.text is final

    # several streams in one model call:
    updates = recognizer.accept({stream_a: samples_a, stream_b: samples_b})

Batching design. Every :class:`Stream` owns a batch-of-one state. The encoder's state keeps every
position and count per stream in tensors of fixed size, so any streams, whatever their positions,
stack into one batch (``model.stack_states``), take one model call (``model.step_window``, each with
its own number of samples, right-aligned) and split again (``state.select``). One tick is one call
in which every stream with audio ready (whole chunks with ``chunk_ms``) feeds as much as the stream
with the least ready; ticks repeat while some stream has more, so streams fed alike take one call
however much each brings. An ONNX export steps one fixed chunk per call. Results never depend on
which other streams were running.

Emission delay (docs/methods.md section 5.3) is measured per output frame: the clock reading when the
:meth:`Stream.accept` call that completed the frame's window was made, to the clock reading after the
model call that produced the frame. Waiting for a chunk to fill, for look-ahead audio, and compute are
all inside it.
"""

from __future__ import annotations

import bisect
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from streamssl.asr.ctc import CTCState, GreedyDecoder, RecognitionModel
from streamssl.export import OnnxModel, export_model
from streamssl.latency import Latency

Clock = Callable[[], float]
BACKENDS = ("torch", "onnx")
# Float PCM lies in [-1, 1]; a little headroom lets resampled or filtered audio overshoot, while int16
# values passed as floats (hundreds to thousands) are caught.
MAX_SAMPLE_MAGNITUDE = 1.5


@dataclass(frozen=True)
class Token:
    """One emitted CTC symbol.

    ``frame`` is the output frame whose arg-max produced it; ``start_s``/``end_s`` bound that frame's
    audio window (seconds from the stream's first sample); ``delay_s`` is its emission delay.
    """

    text: str
    token_id: int
    frame: int
    start_s: float
    end_s: float
    delay_s: float


@dataclass(frozen=True)
class Word:
    """A word, complete once the next word boundary (or the end of the stream) was emitted.

    ``start_s`` is the window start of its first character's frame, ``end_s`` the window end of its last;
    ``delay_s`` is the emission delay of its last character (the moment the whole word was known).
    """

    text: str
    start_s: float
    end_s: float
    delay_s: float


@dataclass
class Update:
    """What one ``accept`` produced for a stream: new ``tokens``, newly completed ``words``, and the
    ``partial`` transcript so far (its last word may still grow)."""

    tokens: list[Token]
    words: list[Word]
    partial: str


@dataclass
class Transcript:
    """The final result of a stream: its ``text`` and every token and word with times."""

    text: str
    tokens: list[Token]
    words: list[Word]

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------------------- recogniser
def _as_samples(samples: Any) -> Tensor:
    """A 1-D float tensor, or ``ValueError`` saying what is wrong with ``samples``."""
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.ascontiguousarray(samples))
    if not isinstance(samples, Tensor):
        raise ValueError(f"samples must be a 1-D numpy array or torch tensor, got {type(samples).__name__}")
    if samples.dim() != 1:
        raise ValueError(f"samples must be 1-D (mono), got shape {tuple(samples.shape)}")
    if not samples.is_floating_point():
        raise ValueError(f"samples must be floating point in [-1, 1], got dtype {samples.dtype}; "
                         "convert integer PCM with x / 32768")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or infinite values")
    peak = float(samples.abs().max()) if samples.numel() else 0.0
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise ValueError(f"samples must be floats in [-1, 1], got a peak magnitude of {peak:g}; integer PCM "
                         "values stored as floats (int16 range) need dividing by 32768")
    return samples


class Recognizer:
    """Streaming greedy-CTC recognition with a :class:`~streamssl.asr.ctc.RecognitionModel`.

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
            :class:`~streamssl.export.OnnxModel` may also be passed as ``model``.
    """

    def __init__(self, model: RecognitionModel, chunk_ms: float | None = None, clock: Clock = time.perf_counter,
                 backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnx" and not isinstance(model, OnnxModel):
            if chunk_ms is None:
                raise ValueError("backend='onnx' runs an export at a fixed chunk size; give chunk_ms")
            model = OnnxModel(export_model(model, chunk_ms)[0])
        error = model.stream_error()
        if error is not None:
            raise ValueError(error)
        if model.hop_samples is None or model.window_samples is None:
            raise ValueError("the recogniser takes waveform input; this model's encoder has frontend='none'")
        if chunk_ms is not None and chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
        self.model = model.eval()
        self.sample_rate = model.sample_rate
        self.hop_samples = model.hop_samples
        self.window_samples = model.window_samples
        self.chunk_ms = chunk_ms
        self.chunk_samples = None if chunk_ms is None else max(1, round(chunk_ms * self.sample_rate / 1000))
        self.clock = clock

    @classmethod
    def from_checkpoint(cls, path: str | Path, chunk_ms: float | None = None,
                        clock: Clock = time.perf_counter, backend: str = "torch") -> "Recognizer":
        """Load a fine-tuned CTC checkpoint (file or run folder) made by ``streamssl finetune``."""
        from streamssl.train.checkpoint import load_checkpoint

        return cls(load_checkpoint(path, kind="finetune").model, chunk_ms, clock, backend)

    def latency(self) -> Latency:
        """The model's declared look-ahead (the chunk wait is :attr:`chunk_ms` on top)."""
        return self.model.latency()

    def stream(self, sample_rate: int | None = None) -> "Stream":
        """A new, independent stream. ``sample_rate``: the rate of the audio it will be fed, if the caller
        knows it; a rate other than the model's is refused (resample first, e.g. with
        ``streamssl.data.audio.resample``), because audio read at the wrong rate is still valid-looking
        samples and would be transcribed as garbage."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(f"sample_rate {sample_rate} Hz: this model takes {self.sample_rate} Hz audio; "
                             "resample it first (streamssl.data.audio.resample)")
        return Stream(self)

    def accept(self, feeds: Mapping["Stream", Any]) -> dict["Stream", Update]:
        """Give samples to several streams at once and advance them in as few model calls as possible.

        ``feeds`` maps each stream to a 1-D float array/tensor of 16 kHz samples (any length).
        """
        now = self.clock()
        # Check every feed before buffering any, so a bad one leaves all streams as they were.
        checked = {}
        for stream, samples in feeds.items():
            if stream.recognizer is not self:
                raise ValueError("a stream of another Recognizer was passed to accept")
            if stream.finished:
                raise ValueError("stream already finished; start a new one with recognizer.stream()")
            checked[stream] = _as_samples(samples)
        for stream, samples in checked.items():
            stream._buffer(samples, now)
        return self._advance(list(feeds), final=False)

    def _advance(self, streams: Iterable["Stream"], final: bool) -> dict["Stream", Update]:
        updates = {s: Update([], [], "") for s in streams}
        # An export steps a fixed chunk; the PyTorch model takes any number of samples per call.
        limit = self.model.info.chunk_samples if isinstance(self.model, OnnxModel) else None
        with torch.inference_mode():
            while True:
                ticking = [s for s in updates if s._ready_samples(final)]
                if not ticking:
                    break
                # Every stream of a tick feeds the same amount, the least any of them has ready: no call
                # computes padding, streams fed alike share one call however much they hold, and those
                # with more go on in the next tick.
                width = min(s._ready_samples(final) for s in ticking)
                if limit is not None:
                    width = min(width, limit)
                chunk = torch.stack([s._take(width) for s in ticking])
                state = ticking[0]._state if len(ticking) == 1 else self.model.stack_states([s._state for s in ticking])
                started, started_cpu = time.perf_counter(), time.process_time()
                log_probs, emitted, state = self.model.step_window(chunk, state)
                compute_s = time.perf_counter() - started
                cpu_s = time.process_time() - started_cpu
                emitted_at = self.clock()
                for i, (stream, n) in enumerate(zip(ticking, emitted.tolist())):
                    stream._state = state if len(ticking) == 1 else state.select([i])
                    stream.compute_s.append(compute_s)
                    stream.cpu_s.append(cpu_s)
                    stream._emit(log_probs[i, :n], emitted_at, updates[stream])
        for stream, update in updates.items():
            update.partial = stream.text
        return updates


class Stream:
    """One audio stream of a :class:`Recognizer`; see the module docstring.

    Attributes:
        tokens, words: everything emitted so far (``words`` holds completed words only).
        frame_delays_s: emission delay of every output frame, blank or not (an ``array('d')``: 8 bytes a
            frame, so an hour of audio keeps 1.4 MB of them).
        compute_s: wall time of each ``step`` call this stream took part in (``array('d')``); flush_s: of
            the final flush.
        cpu_s, flush_cpu_s: CPU time of the process during those calls; on a busy machine it is what a
            call would take with a core to itself (wall time also counts waiting for the CPU).
        samples_in: samples accepted so far.
    """

    def __init__(self, recognizer: Recognizer):
        self.recognizer = recognizer
        model = recognizer.model
        self._state: CTCState = model.init_state(1)
        self._pending = torch.zeros(0, dtype=model.dtype)
        # (samples accepted up to and including this call, clock reading of the call), for the
        # feed time of the sample that completes each frame.
        self._feed_ends: list[int] = []
        self._feed_times: list[float] = []
        self._decoder = GreedyDecoder(model.vocab, 1)
        self._word: list[Token] = []
        self.tokens: list[Token] = []
        # Pieces of the transcript; ``text`` joins them into one, so each read costs only the new ones.
        self._text: list[str] = []
        self.words: list[Word] = []
        self.frame_delays_s = array("d")
        self.compute_s = array("d")
        self.cpu_s = array("d")
        self.flush_s = 0.0
        self.flush_cpu_s = 0.0
        self.samples_in = 0
        self.finished = False

    @property
    def text(self) -> str:
        """The transcript so far."""
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    def accept(self, samples: Any) -> Update:
        """Feed ``samples`` (1-D, float, 16 kHz, any length); returns what became final."""
        return self.recognizer.accept({self: samples})[self]

    def finish(self) -> Transcript:
        """Feed any buffered partial chunk, flush the look-ahead, and return the final transcript."""
        if self.finished:
            raise ValueError("stream already finished")
        update = self.recognizer._advance([self], final=True)[self]
        with torch.inference_mode():
            started, started_cpu = time.perf_counter(), time.process_time()
            log_probs, self._state = self.recognizer.model.flush(self._state)
            self.flush_s = time.perf_counter() - started
            self.flush_cpu_s = time.process_time() - started_cpu
            self._emit(log_probs[0], self.recognizer.clock(), update)
        self._close_word()
        self.finished = True
        return Transcript(self.text, list(self.tokens), list(self.words))

    # ------------------------------------------------------------ internals used by the recogniser
    def _buffer(self, samples: Tensor, now: float) -> None:
        if samples.numel() == 0:
            return
        self._pending = torch.cat([self._pending, samples.to(self._pending.dtype)])
        self.samples_in += samples.numel()
        self._feed_ends.append(self.samples_in)
        self._feed_times.append(now)

    def _ready_samples(self, final: bool) -> int:
        chunk = self.recognizer.chunk_samples
        n = self._pending.numel()
        return n if final or chunk is None else n - n % chunk

    def _take(self, n: int) -> Tensor:
        taken, self._pending = self._pending[:n], self._pending[n:]
        return taken

    def _fed_at(self, frame: int) -> float:
        """Clock reading of the accept call that brought the last sample of ``frame``'s window."""
        needed = frame * self.recognizer.hop_samples + self.recognizer.window_samples
        call = bisect.bisect_left(self._feed_ends, needed)
        # Calls before this one can never complete a later frame, so the record stays small.
        del self._feed_ends[:call], self._feed_times[:call]
        return self._feed_times[0]

    @property
    def frames_out(self) -> int:
        """Output frames emitted so far, blank or not."""
        return self._decoder.frames[0]

    def _emit(self, log_probs: Tensor, emitted_at: float, update: Update) -> None:
        """Greedy CTC on newly final frames ``(m, V)``, merging repeats across calls."""
        rec = self.recognizer
        first = self.frames_out
        delays_s = [emitted_at - self._fed_at(frame) for frame in range(first, first + log_probs.shape[0])]
        self.frame_delays_s.extend(delays_s)
        for frame, token_id in self._decoder.push(log_probs[None])[0]:
            start = frame * rec.hop_samples
            token = Token(rec.model.vocab.symbols[token_id], token_id, frame, start / rec.sample_rate,
                          (start + rec.window_samples) / rec.sample_rate, delays_s[frame - first])
            self.tokens.append(token)
            self._text.append(token.text)
            update.tokens.append(token)
            if token.text == " ":
                word = self._close_word()
                if word is not None:
                    update.words.append(word)
            else:
                self._word.append(token)

    def _close_word(self) -> Word | None:
        if not self._word:
            return None
        chars = self._word
        self._word = []
        word = Word("".join(t.text for t in chars), chars[0].start_s, chars[-1].end_s, chars[-1].delay_s)
        self.words.append(word)
        return word
