"""CTC output vocabularies and greedy CTC decoding, without PyTorch: the torch-free runtime decodes with them.

Log-probabilities may be a ``torch.Tensor`` or a ``numpy.ndarray``; only ``argmax`` and ``tolist`` are used.
"""

from __future__ import annotations

import string
from typing import Any

BLANK = "<blank>"


class CharVocab:
    """CTC output symbols: blank (index 0), space (the word boundary), apostrophe, ``A``-``Z``.

    Transcripts follow the LibriSpeech convention (upper case, apostrophes, single spaces).
    """

    word_boundary = " "

    def __init__(self, symbols: list[str] | None = None):
        self.symbols = list(symbols) if symbols is not None else [BLANK, " ", "'", *string.ascii_uppercase]
        if self.symbols[0] != BLANK or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"a vocabulary starts with {BLANK!r} and has no duplicates, got {self.symbols}")
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def blank(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ``ValueError`` naming a character outside the vocabulary."""
        try:
            return [self.index[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} of {text!r} is not in the vocabulary "
                             f"({''.join(self.symbols[1:])!r}); normalise transcripts first") from None

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: blanks dropped, words separated by single boundaries (a model may emit the
        boundary twice in a row, or at the start or end)."""
        text = "".join(self.symbols[i] for i in ids if i != self.blank)
        return self.word_boundary.join(word for word in text.split(self.word_boundary) if word)


class GreedyDecoder:
    """Best-path (greedy CTC) decoding for a batch of streams, whole utterances or chunk by chunk.

    It keeps the last frame's arg-max per stream, so a character repeated across a chunk boundary is
    merged exactly as it would be inside one chunk. ``frames[b]`` counts the frames stream ``b`` has seen.
    """

    def __init__(self, vocab: CharVocab, batch_size: int):
        self.vocab = vocab
        self.previous = [vocab.blank] * batch_size
        self.frames = [0] * batch_size
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]

    def push(self, log_probs: Any, lengths: Any = None) -> list[list[tuple[int, int]]]:
        """Feed ``log_probs`` ``(B, m, V)`` of newly final frames (the first ``lengths[b]`` of row ``b``
        when given). Returns, per stream, the ``(frame, token_id)`` emitted now; ``frame`` counts from the
        stream's first frame."""
        rows = log_probs.argmax(-1).tolist()
        counts = [len(row) for row in rows] if lengths is None else lengths.tolist()
        new = []
        for b, (row, count) in enumerate(zip(rows, counts)):
            emitted = []
            for offset, token in enumerate(row[:count]):
                if token != self.previous[b] and token != self.vocab.blank:
                    emitted.append((self.frames[b] + offset, token))
                self.previous[b] = token
            self.frames[b] += count
            self.tokens[b] += [token for _, token in emitted]
            new.append(emitted)
        return new

    def finish(self) -> None:
        """End of every stream: each frame's decision was final when it was pushed."""

    def texts(self) -> list[str]:
        return [self.vocab.decode(t) for t in self.tokens]
