"""Endpointing: cutting a live stream's transcript into segments (utterances) without touching the model.

A segment ends after ``silence_ms`` of trailing non-speech that follows speech, or once it has lasted
``max_segment_ms`` from its first speech token. "Speech" is a token other than the word boundary; a frame
is non-speech when its greedy output is blank or the word boundary, so a stretch with no speech tokens
is exactly a stretch of blank-dominated frames (repeats of a speech token are merged by CTC into its
first frame and so count as non-speech too; a held sound longer than ``silence_ms`` is not something
greedy CTC produces).

Why the model state is never reset: the recogniser keeps decoding as if there were no cut, and the
endpointer only decides where to draw lines in the token sequence it already emits. Emitted tokens are
final in greedy CTC, so the segments' tokens, concatenated, are exactly the stream's tokens: no text is
lost or duplicated at a cut wherever it falls, and when cuts fall in non-speech stretches (the silence
rule) the finals' words, joined, are the whole transcript's words. A ``max_segment_ms`` cut can fall
inside a word; then that word is split across two finals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

from streamssl.streaming.engine import Token


@dataclass(frozen=True)
class EndpointConfig:
    """Endpointing rules. ``silence_ms``: non-speech after speech that ends a segment; ``max_segment_ms``:
    longest segment, from its first speech token (``None``: no limit)."""

    silence_ms: float = 600.0
    max_segment_ms: float | None = 20000.0

    def __post_init__(self) -> None:
        if not self.silence_ms > 0 or not math.isfinite(self.silence_ms):
            raise ValueError(f"silence_ms must be a positive number of milliseconds, got {self.silence_ms}")
        if self.max_segment_ms is not None and (not self.max_segment_ms > 0 or not math.isfinite(self.max_segment_ms)):
            raise ValueError(f"max_segment_ms must be positive or None, got {self.max_segment_ms}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Segment:
    """One ended segment. ``tokens``: every token emitted between the previous cut and this one (word
    boundaries included); ``text``: their text without leading/trailing boundaries; ``start_s``/``end_s``:
    window start of the first and window end of the last speech token (seconds from the stream's start);
    ``cut_frame``: first output frame of the next segment; ``reason``: ``"silence"``, ``"max_length"`` or
    ``"end_of_stream"``."""

    index: int
    tokens: list[Token]
    text: str
    start_s: float
    end_s: float
    cut_frame: int
    reason: str


@dataclass
class _Open:
    tokens: list[Token] = field(default_factory=list)
    first_speech: Token | None = None
    last_speech: Token | None = None


class Endpointer:
    """Cuts one stream's token sequence into :class:`Segment` s, frame-exactly and independent of how the
    tokens arrive (one call per model step or all at once give the same segments).

    Args:
        config: the rules.
        frame_s: output frame period in seconds (the recogniser's ``hop_samples / sample_rate``).
        word_boundary: the token text that separates words (the recogniser's ``word_boundary``, from its
            vocabulary); it does not count as speech.
    """

    def __init__(self, config: EndpointConfig, frame_s: float, word_boundary: str = " "):
        if not frame_s > 0:
            raise ValueError(f"frame_s must be positive, got {frame_s}")
        self.config = config
        self.frame_s = frame_s
        self.word_boundary = word_boundary
        # Whole frames, rounded up, so a cut never comes before the configured time has passed.
        self.silence_frames = max(1, math.ceil(config.silence_ms / 1000 / frame_s - 1e-9))
        self.max_frames = (None if config.max_segment_ms is None
                           else max(1, math.ceil(config.max_segment_ms / 1000 / frame_s - 1e-9)))
        self.segments_done = 0
        self._open = _Open()
        self._frames_seen = 0

    @property
    def open_tokens(self) -> list[Token]:
        """Tokens of the segment in progress."""
        return list(self._open.tokens)

    def open_text(self) -> str:
        """Text of the segment in progress (its partial)."""
        return self._text(self._open.tokens)

    def update(self, tokens: Iterable[Token], frames_out: int) -> list[Segment]:
        """Take the stream's new ``tokens`` (in frame order) once it has decoded ``frames_out`` frames in
        all; returns the segments that ended within those frames, in order."""
        ended: list[Segment] = []
        for token in tokens:
            if token.frame < self._frames_seen:
                raise ValueError(f"token at frame {token.frame} arrived after frame {self._frames_seen} was decoded")
            self._cut_before(token.frame, ended)
            self._open.tokens.append(token)
            if token.text != self.word_boundary:
                self._open.first_speech = self._open.first_speech or token
                self._open.last_speech = token
            self._frames_seen = token.frame + 1
        if frames_out < self._frames_seen:
            raise ValueError(f"frames_out={frames_out} is before frame {self._frames_seen - 1}, already seen")
        self._cut_before(frames_out, ended)
        self._frames_seen = frames_out
        return ended

    def finish(self, frames_out: int) -> Segment | None:
        """The stream ended after ``frames_out`` frames: the segment in progress, if it holds speech."""
        open_ = self._open
        if open_.first_speech is None:
            self._open = _Open()
            return None
        return self._close(max(frames_out, self._frames_seen), "end_of_stream")

    def _cut_before(self, frame: int, ended: list[Segment]) -> None:
        """Close the open segment if a rule fires at or before ``frame`` (no token between)."""
        open_ = self._open
        if open_.first_speech is None:
            return
        silence_cut = open_.last_speech.frame + 1 + self.silence_frames
        length_cut = None if self.max_frames is None else open_.first_speech.frame + self.max_frames
        if length_cut is not None and length_cut <= min(frame, silence_cut):
            ended.append(self._close(length_cut, "max_length"))
        elif silence_cut <= frame:
            ended.append(self._close(silence_cut, "silence"))

    def _close(self, cut_frame: int, reason: str) -> Segment:
        open_ = self._open
        segment = Segment(self.segments_done, open_.tokens, self._text(open_.tokens), open_.first_speech.start_s,
                          open_.last_speech.end_s, cut_frame, reason)
        self.segments_done += 1
        self._open = _Open()
        return segment

    def _text(self, tokens: list[Token]) -> str:
        # The words are the tokens' text split at the boundary (a token of its own, or a piece's first mark).
        return " ".join(word for word in "".join(t.text for t in tokens).split(self.word_boundary) if word)
