"""The one batched streaming core: many streams, each with its own backlog, through a model's ``step_window``.

Every streaming path runs through :class:`StreamingEngine`: the :class:`~streamssl.streaming.Recognizer`
(``streamssl stream`` and ``streamssl serve``), streaming evaluation (``evaluate --streaming``, the demo's
streaming row) and the contract tests. What it does, once:

- **Batching.** Each :class:`Stream` owns its backlog of input and its model state. The state keeps every
  position and count per stream in tensors of fixed size, so any streams, whatever their positions, stack
  into one batch (``model.stack_states``), take one ``model.step_window`` call (each stream with its own
  number of samples, right-aligned, the rest filler) and split again (``state.select``). A tick feeds every
  stream with audio ready its whole ready backlog (whole chunks of ``chunk_samples`` until it ends), at most
  ``max_tick_samples``; streams join and leave between ticks. While the members of consecutive ticks stay
  the same, their stacked state is kept as it is, so a steady batch pays no stacking.
- **Decoding.** Each stream has its own decoder from a factory (:func:`decoder_factory`: greedy CTC, the
  lexicon beam search with its LM and the stream's hotwords, or anything with :class:`StreamDecoder`'s
  methods). Emitted tokens carry their frame, audio window and emission delay. Greedy CTC's words come from
  one word builder (:class:`WordBuilder`) that splits its tokens at the vocabulary's word boundary; a beam
  search's words are its best hypothesis: each partial is that hypothesis, split into the *stable* words
  every hypothesis of the beam agrees on (final, never revised) and the unstable tail, and a word is
  emitted, with its emission delay, when it becomes stable.
- **Time.** One emission-delay clock (:class:`ArrivalLog`): when the input that completes an output frame's
  window arrived, to the clock reading once the frame's tokens are decoded. A call's compute time is split
  evenly among its streams, so a real-time factor summed over streams is right at any batch size.

Results never depend on which other streams share a call, nor on how the input was chunked.

The core is numpy and imports no PyTorch, so an exported model runs without it
(:class:`~streamssl.runtime.model.OnnxModel`). A PyTorch model is stepped through
:class:`~streamssl.streaming.torch_model.TorchStepModel` (numpy in and out, no copies), which the engine
builds for any ``torch.nn.Module`` it is given.
"""

from __future__ import annotations

import bisect
import math
import sys
import time
from array import array
from time import thread_time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from streamssl.asr.vocab import GreedyDecoder, split_word_start

if TYPE_CHECKING:
    from streamssl.asr.lexicon import BeamSearchConfig, DecodedWord

Clock = Callable[[], float]


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
    """A word: ``start_s`` is the window start of its first symbol's frame, ``end_s`` the window end of its
    last; ``delay_s`` is its emission delay: from the arrival of the input that completes its last symbol's
    frame to the moment the word was final (greedy CTC: its last symbol decoded; a beam search: the word
    became stable). ``confidence``: a beam search's word confidence in (0, 1]
    (:class:`~streamssl.asr.lexicon.DecodedWord`); ``None`` for greedy CTC."""

    text: str
    start_s: float
    end_s: float
    delay_s: float
    confidence: float | None = None


@dataclass
class Update:
    """What one call produced for a stream: new ``tokens``, newly final ``words``, and the ``partial``
    transcript so far: its ``stable`` words (final) then its ``unstable`` tail (greedy CTC: the word still
    growing; a beam search: the best hypothesis' words the beam does not agree on yet, and the letters of
    the word it is in)."""

    tokens: list[Token]
    words: list[Word]
    partial: str
    stable: str = ""
    unstable: str = ""


@dataclass
class Transcript:
    """The final result of a stream: its ``text`` and every token and word with times."""

    text: str
    tokens: list[Token]
    words: list[Word]

    def __str__(self) -> str:
        return self.text


class StreamDecoder(Protocol):
    """One stream's decoder. ``push`` takes the outputs of newly final frames ``(m, ...)`` and returns the
    ``(frame, token_id)`` pairs that became final with them (frames count from the stream's first);
    ``finish`` ends the stream and returns the last ones; ``text`` is the transcript so far (final once
    finished).

    A decoder that finds words itself (a beam search) also has ``hypothesis()``: its best hypothesis
    (:class:`~streamssl.asr.lexicon.DecodedWord` s) and how many of its first words are stable,
    ``spelling()``: the letters of the word it is in, and ``end_segment()``: close every word here (an
    endpoint) and start afresh. The stream's words then come from it instead of from the tokens.
    """

    def push(self, outputs: np.ndarray) -> list[tuple[int, int]]: ...

    def finish(self) -> list[tuple[int, int]]: ...

    def text(self) -> str: ...


class GreedyStreamDecoder:
    """Greedy CTC over one stream: each frame's token is final when the frame is. ``cpu_s``: the CPU time
    of the calling thread spent decoding.

    The text grows as tokens come (what ``vocab.decode`` gives for all of them: single boundaries, none
    at the ends), so reading it after every call costs only the new tokens, however long the stream.
    """

    def __init__(self, vocab):
        self._decoder = GreedyDecoder(vocab, 1)
        self._symbols, self._boundary = vocab.symbols, vocab.word_boundary
        self._text = ""
        self._boundary_pending = False
        self.cpu_s = 0.0

    def push(self, log_probs: np.ndarray) -> list[tuple[int, int]]:
        started = thread_time()
        new = self._decoder.push(log_probs[None])[0]
        pieces = []
        for _, token_id in new:
            starts_word, letters = split_word_start(self._symbols[token_id], self._boundary)
            if starts_word:
                self._boundary_pending = bool(self._text or pieces)
            if not letters:
                continue
            if self._boundary_pending:
                pieces.append(" ")
                self._boundary_pending = False
            pieces.append(letters)
        if pieces:
            self._text += "".join(pieces)
        self.cpu_s += thread_time() - started
        return new

    def finish(self) -> list[tuple[int, int]]:
        return []

    def text(self) -> str:
        return self._text


class LexiconStreamDecoder:
    """The lexicon beam search over one stream (frame-synchronous), with ``hotwords`` phrases. Its tokens
    are greedy CTC's (what endpointing reads); its words are the beam's (``hypothesis``), and ``text``
    is its best hypothesis (the final transcript once finished). ``cpu_s``: the CPU time of the calling
    thread spent decoding (the beam search, its stable words, the greedy tokens)."""

    def __init__(self, vocab, config: BeamSearchConfig, hotwords: Sequence[Sequence[str]] = ()):
        from streamssl.asr.lexicon import LexiconDecoder

        self._decoder = LexiconDecoder(vocab, 1, config, hotwords)
        self._greedy = GreedyDecoder(vocab, 1)
        self.cpu_s = 0.0

    def push(self, log_probs: np.ndarray) -> list[tuple[int, int]]:
        started = thread_time()
        if log_probs.shape[0]:
            self._decoder.push(log_probs[None])
        new = self._greedy.push(log_probs[None])[0]
        self.cpu_s += thread_time() - started
        return new

    def finish(self) -> list[tuple[int, int]]:
        started = thread_time()
        self._decoder.finish()
        self.cpu_s += thread_time() - started
        return []

    def text(self) -> str:
        return self._decoder.texts()[0]

    def hypothesis(self) -> tuple[list[DecodedWord], int]:
        return self._decoder.hypothesis(0)

    def spelling(self) -> str:
        return self._decoder.spelling(0)

    def end_segment(self) -> None:
        started = thread_time()
        self._decoder.end_segment(0)
        self.cpu_s += thread_time() - started


def decoder_factory(vocab, beam: BeamSearchConfig | None = None) -> Callable[..., StreamDecoder]:
    """A factory of one stream's decoder over ``vocab``: greedy CTC, or with ``beam`` the lexicon beam
    search with its options. The factory takes the stream's hotword phrases (tuples of words; only the
    beam search takes them)."""
    def make(hotwords: Sequence[Sequence[str]] = ()) -> StreamDecoder:
        if beam is None:
            if hotwords:
                raise ValueError("hotwords need the lexicon decoder (--decoder lexicon); this one is greedy CTC")
            return GreedyStreamDecoder(vocab)
        return LexiconStreamDecoder(vocab, beam, hotwords)

    return make


class ArrivalLog:
    """When a stream's input arrived: one ``(input units received so far, clock reading)`` entry a delivery.

    ``units_per_sample`` converts the model's sample positions to the input's units: 1 when the input is
    what the model reads, ``client_rate / model_rate`` for audio resampled on the way in (the server), so a
    frame counts from the arrival of the client audio that completes it, resampler delay included. Lookups
    come in frame order, so entries before the one found are dropped and the log stays small.
    """

    def __init__(self, units_per_sample: float = 1.0):
        self.units_per_sample = units_per_sample
        self._log: list[tuple[int, float]] = []

    def record(self, received: int, at: float) -> None:
        """``received`` input units have arrived in all, the last of them at clock reading ``at``."""
        self._log.append((received, at))

    def time_of(self, samples: int) -> float:
        """Arrival time of the input holding model sample ``samples - 1`` (the first ``samples`` complete).
        Past the last delivery (frames the end-of-stream flush pads) it is the last delivery's."""
        needed = math.ceil(samples * self.units_per_sample - 1e-6)
        index = min(bisect.bisect_left(self._log, needed, key=lambda entry: entry[0]), len(self._log) - 1)
        del self._log[:index]
        return self._log[0][1]


class WordBuilder:
    """Groups one stream's tokens into words at ``boundary`` (the vocabulary's word separator)."""

    def __init__(self, boundary: str):
        self.boundary = boundary
        self._open: list[Token] = []

    @property
    def open_tokens(self) -> list[Token]:
        """The tokens of the word in progress."""
        return list(self._open)

    def push(self, token: Token) -> Word | None:
        """Take the next token; returns the word it completed, if any (a token that starts a word, the
        space of characters or a piece beginning with U+2581, completes the one before)."""
        starts_word, letters = split_word_start(token.text, self.boundary)
        word = self.close() if starts_word else None
        if letters:
            self._open.append(token)
        return word

    def close(self) -> Word | None:
        """The stream (or segment) ended: the word in progress, if any."""
        if not self._open:
            return None
        chars, self._open = self._open, []
        text = "".join(split_word_start(t.text, self.boundary)[1] for t in chars)
        return Word(text, chars[0].start_s, chars[-1].end_s, chars[-1].delay_s)


def words_of(tokens: Iterable[Token], boundary: str) -> list[Word]:
    """The words of a run of tokens (a segment, a whole stream)."""
    builder = WordBuilder(boundary)
    words = [word for token in tokens if (word := builder.push(token)) is not None]
    last = builder.close()
    return words + ([last] if last is not None else [])


class Stream:
    """One stream of a :class:`StreamingEngine`.

    Attributes:
        tokens, words: everything emitted so far (``words`` holds completed words only).
        arrivals: when its input arrived (:class:`ArrivalLog`); the engine records each ``feed`` with a time.
        frame_delays_s: emission delay of every output frame, blank or not (an ``array('d')``: 8 bytes a
            frame, so an hour of audio keeps 1.4 MB of them).
        compute_s, cpu_s: this stream's share of the wall and process CPU time of each call it took part in
            (``array('d')``); flush_s, flush_cpu_s: of the final flush. On a busy machine CPU time is what a
            call would take with a core to itself.
        samples_in: input units (samples, or frames for frame input) fed so far.
    """

    def __init__(self, engine: "StreamingEngine", arrival_units_per_sample: float | None = None,
                 hotwords: Sequence[Sequence[str]] = ()):
        self.engine = engine
        self._state: Any = engine.stepper.init_state(1)
        # The stream's state lives in the engine's current batch (row ``_row``) while it is a member.
        self._row: int | None = None
        self._pending_parts: list[np.ndarray] = []
        self.decoder = engine.decoder(hotwords) if hotwords else engine.decoder()
        # A beam search finds the words itself; greedy CTC's come from its tokens. Its words become final
        # later than their frames, so the arrival times of the frames from the last final word on are kept
        # (the arrival log forgets what is behind its latest lookup).
        self.decoder_finds_words = hasattr(self.decoder, "hypothesis")
        self._frame_arrivals = array("d")
        self._arrivals_from = 0
        self._words = WordBuilder(engine.word_boundary)
        self.arrivals = ArrivalLog(arrival_units_per_sample or 1.0)
        # The caller records arrivals itself, in the source's units (see ArrivalLog), when it gave their scale.
        self.records_arrivals = arrival_units_per_sample is None
        self.tokens: list[Token] = []
        self.words: list[Word] = []
        self._stable_text, self._stable_words = "", 0
        self.frames_out = 0
        self.frame_delays_s = array("d")
        self.compute_s = array("d")
        self.cpu_s = array("d")
        self.flush_s = 0.0
        self.flush_cpu_s = 0.0
        self.samples_in = 0
        self.finished = False

    @property
    def text(self) -> str:
        """The transcript so far (words separated by single spaces)."""
        return self.decoder.text()

    @property
    def decoder_cpu_s(self) -> float | None:
        """CPU seconds its decoder spent (``None``: the decoder does not say), within :attr:`cpu_s`."""
        return getattr(self.decoder, "cpu_s", None)

    @property
    def stable_text(self) -> str:
        """The final words so far (:attr:`words`), separated by single spaces. Read after every call, so
        only the words added since the last read are joined, however long the stream."""
        if self._stable_words < len(self.words):
            added = " ".join(word.text for word in self.words[self._stable_words:])
            self._stable_text = f"{self._stable_text} {added}" if self._stable_text else added
            self._stable_words = len(self.words)
        return self._stable_text

    @property
    def unstable_text(self) -> str:
        """What follows :attr:`stable_text` in the partial transcript and may still change: greedy CTC's
        word in progress; a beam search's unstable words and the letters of the word it is in."""
        if not self.decoder_finds_words:
            return "".join(token.text for token in self._words.open_tokens)
        words, _ = self.decoder.hypothesis()
        return " ".join([w.text for w in words[len(self.words):]] + [self.decoder.spelling()]).strip()

    def end_segment(self) -> list[Word]:
        """An endpoint: a beam search closes every word so far, and they become final (returned, with their
        emission delays from now); the next word starts a new sentence for its LM. Greedy CTC's words
        are final as they come, so it returns nothing."""
        if not self.decoder_finds_words:
            return []
        self.decoder.end_segment()
        return self._final_words(self.engine.clock())

    @property
    def state(self) -> Any:
        """This stream's model state, batch of one (taken out of the engine's current batch if it is there)."""
        self.engine._release([self])
        return self._state

    @property
    def pending_samples(self) -> int:
        """Input fed but not yet given to the model."""
        return sum(part.shape[0] for part in self._pending_parts)

    def accept(self, samples: Any) -> Update:
        """Feed ``samples`` and advance; returns what became final."""
        return self.engine.accept({self: samples})[self]

    def finish(self) -> Transcript:
        """Feed any buffered partial chunk, flush the look-ahead, and return the final transcript."""
        return self.engine.finish([self])[self]

    # ------------------------------------------------------------ used by the engine
    def _ready(self, final: bool) -> int:
        chunk = self.engine.chunk_samples
        n = self.pending_samples
        return n if final or chunk is None else n - n % chunk

    def _take(self, n: int) -> np.ndarray:
        pending = np.concatenate(self._pending_parts) if len(self._pending_parts) > 1 else self._pending_parts[0]
        taken, rest = pending[:n], pending[n:]
        self._pending_parts = [rest] if rest.shape[0] else []
        return taken

    def _emit(self, new: list[tuple[int, int]], first: int, count: int, emitted_at: float, update: Update) -> None:
        """Record ``count`` newly final frames from frame ``first`` on, and the tokens ``new`` among them."""
        engine = self.engine
        arrived = [self.arrivals.time_of(frame * engine.hop_samples + engine.window_samples)
                   for frame in range(first, first + count)]
        delays = [emitted_at - at for at in arrived]
        if self.decoder_finds_words:
            self._frame_arrivals.extend(arrived)
        self.frame_delays_s.extend(delays)
        for frame, token_id in new:
            start = frame * engine.hop_samples
            token = Token(engine.symbols[token_id], token_id, frame, start / engine.sample_rate,
                          (start + engine.window_samples) / engine.sample_rate,
                          delays[frame - first] if first <= frame < first + count else 0.0)
            self.tokens.append(token)
            update.tokens.append(token)
            word = None if self.decoder_finds_words else self._words.push(token)
            if word is not None:
                self.words.append(word)
                update.words.append(word)
        if self.decoder_finds_words:
            update.words += self._final_words(emitted_at)

    def _final_words(self, emitted_at: float) -> list[Word]:
        """The beam search's words that became stable since the last call, as :class:`Word` s final at
        clock reading ``emitted_at``."""
        engine = self.engine
        words, stable = self.decoder.hypothesis()
        new = []
        for decoded in words[len(self.words):stable]:
            end = decoded.last_frame * engine.hop_samples + engine.window_samples
            arrived = self._frame_arrivals[decoded.last_frame - self._arrivals_from]
            word = Word(decoded.text, decoded.first_frame * engine.hop_samples / engine.sample_rate,
                        end / engine.sample_rate, emitted_at - arrived, decoded.confidence)
            self.words.append(word)
            new.append(word)
        if new:
            last = words[len(self.words) - 1].last_frame
            del self._frame_arrivals[:last - self._arrivals_from]
            self._arrivals_from = last
        return new


class StreamingEngine:
    """Batched streaming through a model with the streaming API of :class:`~streamssl.asr.ctc.CTCModel`
    (``init_state``, ``stack_states``, ``step_window``, ``flush_window``, and ``select`` on its state): a
    CTC model, its ONNX export, or a bare :class:`~streamssl.Encoder`.

    Args:
        model: the model, in eval mode: one with that API in numpy (an ONNX export), or a
            ``torch.nn.Module``, which is stepped through :class:`~streamssl.streaming.torch_model.TorchStepModel`
            (:attr:`stepper`).
        decoder: a factory of one stream's :class:`StreamDecoder` (default: greedy CTC over ``model.vocab``);
            called with the stream's hotwords when it has some.
        chunk_samples: ``None`` steps on whatever is fed; a number buffers input and steps in whole chunks of
            it (the rest waits for more input or :meth:`finish`). Outputs never depend on it.
        max_tick_samples: most input a stream gives one call (an export's fixed chunk; a bound that keeps
            one stream's long backlog from making every stream of a call wait). ``None``: no bound.
        clock: seconds, monotonic; emission delays are differences of its readings.
    """

    def __init__(self, model: Any, decoder: Callable[..., StreamDecoder] | None = None,
                 chunk_samples: int | None = None, max_tick_samples: int | None = None,
                 clock: Clock = time.perf_counter):
        for name, value in (("chunk_samples", chunk_samples), ("max_tick_samples", max_tick_samples)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.model = model
        self.stepper = _numpy_stepper(model)
        self.chunk_samples = chunk_samples
        self.max_tick_samples = max_tick_samples
        self.clock = clock
        vocab = getattr(model, "vocab", None)
        self.symbols = vocab.symbols if vocab is not None else []
        self.word_boundary = getattr(vocab, "word_boundary", " ")
        self.decoder = decoder or decoder_factory(vocab)
        self.hop_samples, self.window_samples, self.sample_rate = _frame_geometry(model)
        self._members: tuple[Stream, ...] = ()
        self._batch_state: Any = None
        self.calls = 0

    def stream(self, arrival_units_per_sample: float | None = None,
               hotwords: Sequence[Sequence[str]] = ()) -> Stream:
        """A new, independent stream. By default :meth:`feed` records when its input arrived; given
        ``arrival_units_per_sample`` (see :class:`ArrivalLog`), the caller records arrivals itself in
        ``stream.arrivals``, in the units of the source it resamples. ``hotwords``: the stream's hotword
        phrases, for a beam search decoder (:func:`decoder_factory`)."""
        return Stream(self, arrival_units_per_sample, hotwords)

    def feed(self, stream: Stream, samples: Any, at: float) -> None:
        """Buffer ``samples`` ``(n, ...)`` (a numpy array, or anything ``numpy.asarray`` takes: a CPU tensor)
        for ``stream``, arrived at clock reading ``at`` (not recorded for a stream whose caller records
        arrivals itself)."""
        if stream.engine is not self:
            raise ValueError("a stream of another engine was given")
        if stream.finished:
            raise ValueError("stream already finished; start a new one")
        samples = np.asarray(samples, dtype=self.stepper.dtype)
        if samples.shape[0] == 0:
            return
        stream._pending_parts.append(samples)
        stream.samples_in += samples.shape[0]
        if stream.records_arrivals:
            stream.arrivals.record(stream.samples_in, at)

    def accept(self, feeds: Mapping[Stream, Any]) -> dict[Stream, Update]:
        """Feed several streams at once (arrived now) and advance them."""
        now = self.clock()
        for stream, samples in feeds.items():
            self.feed(stream, samples, now)
        return self.advance(list(feeds))

    def advance(self, streams: Iterable[Stream], final: bool = False) -> dict[Stream, Update]:
        """Step ``streams`` over their ready input, in as few calls as possible; ``final`` also steps a
        last partial chunk."""
        updates = {s: Update([], [], "") for s in streams}
        while True:
            ready = [(s, n) for s in updates if (n := s._ready(final)) > 0]
            if not ready:
                break
            width = max(n for _, n in ready)
            if self.max_tick_samples is not None:
                width = min(width, self.max_tick_samples)
            self._tick([s for s, _ in ready], [min(n, width) for _, n in ready], width, updates)
        for stream, update in updates.items():
            update.partial, update.stable, update.unstable = stream.text, stream.stable_text, stream.unstable_text
        return updates

    def finish(self, streams: Sequence[Stream]) -> dict[Stream, Transcript]:
        """End ``streams`` together: step their rest, flush their look-ahead in one call, close their words."""
        for stream in streams:
            if stream.engine is not self:
                raise ValueError("a stream of another engine was given")
            if stream.finished:
                raise ValueError("stream already finished")
        self.advance(streams, final=True)
        started, started_cpu = time.perf_counter(), time.process_time()
        state = self._state_of(list(streams))
        outputs, emitted, _ = self.stepper.flush_window(state)
        finals = []
        for row, (stream, count) in enumerate(zip(streams, emitted.tolist())):
            new = stream.decoder.push(outputs[row, :count])
            finals.append((new + stream.decoder.finish(), stream.frames_out, count))
            stream.frames_out += count
        wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        emitted_at = self.clock()
        self._release(streams)
        results = {}
        for stream, (new, first, count) in zip(streams, finals):
            stream.flush_s, stream.flush_cpu_s = wall / len(streams), cpu / len(streams)
            stream._emit(new, first, count, emitted_at, Update([], [], ""))
            last = stream._words.close()
            if last is not None:
                stream.words.append(last)
            stream.finished = True
            results[stream] = Transcript(stream.text, list(stream.tokens), list(stream.words))
        return results

    def close(self, stream: Stream) -> None:
        """Drop ``stream`` unfinished (its source went away): the engine keeps no reference to it."""
        if stream in self._members:
            self._release(self._members)
        stream.finished = True

    # ------------------------------------------------------------ batching
    def _tick(self, streams: list[Stream], counts: list[int], width: int, updates: dict[Stream, Update]) -> None:
        """One ``step_window`` call: stream ``i`` gives ``counts[i]`` samples, right-aligned in ``width``."""
        started, started_cpu = time.perf_counter(), time.process_time()
        pieces = [s._take(n) for s, n in zip(streams, counts)]
        # A fresh array each call: a model may keep views of its input in its state.
        chunk = np.zeros((len(pieces), width, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
        for row, piece in enumerate(pieces):
            chunk[row, width - piece.shape[0]:] = piece
        state = self._state_of(streams)
        outputs, emitted, state = self.stepper.step_window(chunk, state, np.array(counts, dtype=np.int64))
        self._members, self._batch_state = tuple(streams), state
        self.calls += 1
        decoded = []
        for row, (stream, count) in enumerate(zip(streams, emitted.tolist())):
            stream._row = row
            decoded.append((stream.decoder.push(outputs[row, :count]), stream.frames_out, count))
            stream.frames_out += count
        wall, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        emitted_at = self.clock()
        for stream, (new, first, count) in zip(streams, decoded):
            stream.compute_s.append(wall / len(streams))
            stream.cpu_s.append(cpu / len(streams))
            stream._emit(new, first, count, emitted_at, updates[stream])

    def _state_of(self, streams: list[Stream]) -> Any:
        """The stacked state of ``streams``, in order: the current batch's as it is when they are its members."""
        if tuple(streams) == self._members:
            return self._batch_state
        self._release(self._members)
        if len(streams) == 1:
            return streams[0]._state
        return self.stepper.stack_states([s._state for s in streams])

    def _release(self, streams: Iterable[Stream]) -> None:
        """Give members of the current batch their own state again (the batch is about to change)."""
        members = self._members
        if not members:
            return
        for stream in streams:
            if stream._row is not None and stream in members:
                stream._state = (self._batch_state if len(members) == 1
                                 else self._batch_state.select([stream._row]))
                stream._row = None
        if all(s._row is None for s in members):
            self._members, self._batch_state = (), None


def _numpy_stepper(model: Any) -> Any:
    """``model`` itself, or for a ``torch.nn.Module`` its numpy :class:`~streamssl.streaming.torch_model.TorchStepModel`.
    A PyTorch model exists only once torch is imported, so asking ``sys.modules`` keeps this torch-free."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from streamssl.streaming.torch_model import TorchStepModel

        return TorchStepModel(model)
    return model


def _frame_geometry(model: Any) -> tuple[int, int, int]:
    """``(hop, window, rate)``: input units per output frame, units that complete frame 0, units a second.

    A CTC model or export says it (``hop_samples``/``window_samples``, ``None`` for frame input); a bare
    encoder through its frontend's geometry. Frame input counts one unit a frame.
    """
    if hasattr(model, "hop_samples"):
        hop, window, rate = model.hop_samples, model.window_samples, model.sample_rate
    else:
        geometry = model.frontend.geometry
        frames = model.frontend.input_dim is not None
        hop, window = (None, None) if frames else (geometry.hop, geometry.hop + geometry.lookahead)
        rate = model.config.sample_rate
    if hop is None:
        return 1, 1, rate
    return hop, window, rate
