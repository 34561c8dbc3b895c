"""CTC output vocabularies and greedy CTC decoding, without PyTorch: the torch-free runtime decodes with them.

Two vocabularies share one interface (``symbols``, ``blank``, ``encode``, ``decode``, ``word_boundary``,
``kind``, ``letters``, ``spell``): :class:`CharVocab` (letters, apostrophe and a space token) and
:class:`SentencePieceVocab` (subword pieces of a sentencepiece model trained on the training
transcripts, a word starting at a piece that begins with U+2581). In both, the words of a token
sequence are its symbols concatenated and split at ``word_boundary`` (:func:`split_word_start` reads
one symbol that way).

Log-probabilities may be a ``torch.Tensor`` or a ``numpy.ndarray``; only ``argmax`` and ``tolist`` are used.
"""

from __future__ import annotations

import io
import string
from collections.abc import Iterable, Sequence
from typing import Any

BLANK = "<blank>"
# sentencepiece's word-start mark: a piece beginning with it starts a word.
PIECE_BOUNDARY = "\u2581"
PIECE_UNKNOWN = "<unk>"
VOCAB_KINDS = ("characters", "sentencepiece")


def split_word_start(symbol: str, boundary: str) -> tuple[bool, str]:
    """Whether ``symbol`` starts a new word (it begins with ``boundary``), and the letters it writes:
    ``(True, "")`` for the space of characters, ``(True, "THE")`` for the piece ``\u2581THE``,
    ``(False, "ING")`` for ``ING``."""
    if symbol.startswith(boundary):
        return True, symbol[len(boundary):]
    return False, symbol


class _Vocab:
    """What both vocabularies share: ``symbols`` (blank first), their ``index`` and the words of a token
    sequence, split at ``word_boundary``."""

    symbols: list[str]
    index: dict[str, int]
    word_boundary: str

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def blank(self) -> int:
        return 0

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``: blanks dropped, symbols joined, single spaces between words (a model may emit
        a boundary twice in a row, or at the start or end; the streaming engine's words are the same split)."""
        text = "".join(self.symbols[i] for i in ids if i != self.blank)
        return " ".join(word for word in text.split(self.word_boundary) if word)


class CharVocab(_Vocab):
    """CTC output symbols: blank (index 0), space (the word boundary), apostrophe, ``A``-``Z``.

    Transcripts follow the LibriSpeech convention (upper case, apostrophes, single spaces).
    """

    word_boundary = " "
    kind = "characters"

    def __init__(self, symbols: list[str] | None = None):
        self.symbols = list(symbols) if symbols is not None else [BLANK, " ", "'", *string.ascii_uppercase]
        if self.symbols[0] != BLANK or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"a vocabulary starts with {BLANK!r} and has no duplicates, got {self.symbols}")
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ``ValueError`` naming a character outside the vocabulary."""
        try:
            return [self.index[c] for c in text]
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} of {text!r} is not in the vocabulary "
                             f"({''.join(self.symbols[1:])!r}); normalise transcripts first") from None

    @property
    def letters(self) -> str:
        """The characters a word may be spelt with."""
        return "".join(s for s in self.symbols[1:] if len(s) == 1 and s != self.word_boundary)

    @property
    def separator(self) -> int:
        """The token the lexicon search ends every word with (its silence): the space."""
        return self.index[self.word_boundary]

    def spell(self, word: str) -> list[int]:
        """The tokens of ``word`` in a lexicon: its letters, then the space that ends it."""
        return self.encode(word) + [self.separator]


class SentencePieceVocab(_Vocab):
    """CTC output symbols: blank (index 0), then the pieces of a sentencepiece model (its ``<unk>``
    first), so piece ``i`` of the model is token ``i + 1``.

    ``model_proto``: the serialised sentencepiece model (what :func:`train_sentencepiece` returns), needed
    to ``encode``; a vocabulary rebuilt from ``symbols`` alone (an exported model's) decodes only.
    """

    word_boundary = PIECE_BOUNDARY
    kind = "sentencepiece"

    def __init__(self, symbols: Sequence[str] | None = None, model_proto: bytes | None = None):
        self._processor = None
        if model_proto is not None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_proto=bytes(model_proto))
            pieces = [BLANK] + [self._processor.id_to_piece(i) for i in range(self._processor.get_piece_size())]
            if symbols is not None and list(symbols) != pieces:
                raise ValueError("the sentencepiece model's pieces are not the vocabulary's symbols")
            symbols = pieces
        if symbols is None:
            raise ValueError("a sentencepiece vocabulary needs its model_proto or its symbols")
        self.symbols = list(symbols)
        self.model_proto = bytes(model_proto) if model_proto is not None else None
        if self.symbols[0] != BLANK or PIECE_UNKNOWN not in self.symbols or len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"a sentencepiece vocabulary starts with {BLANK!r}, holds {PIECE_UNKNOWN!r} and has "
                             f"no duplicates, got {self.symbols[:10]}...")
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; raises ``ValueError`` naming a character the pieces cannot spell."""
        if self._processor is None:
            raise ValueError("this sentencepiece vocabulary was rebuilt from its symbols alone and only decodes; "
                             "encoding needs its model_proto (in the checkpoint)")
        ids = [i + 1 for i in self._processor.encode(text)]
        unknown = self.index[PIECE_UNKNOWN]
        if unknown in ids:
            missing = sorted(set(text) - set(self.letters) - {" "})
            raise ValueError(f"characters {missing} of {text!r} are not in the sentencepiece vocabulary "
                             f"(letters {self.letters!r}); normalise transcripts first")
        return ids

    @property
    def letters(self) -> str:
        """The characters a word may be spelt with (those of the pieces)."""
        found = {c for s in self.symbols[1:] if s != PIECE_UNKNOWN for c in s if c != self.word_boundary}
        return "".join(sorted(found))

    @property
    def separator(self) -> int:
        """The lexicon search's silence token: ``<unk>``, which no transcript is spelt with, since a word
        ends with its last piece (the next word's first piece starts with the boundary)."""
        return self.index[PIECE_UNKNOWN]

    def spell(self, word: str) -> list[int]:
        """The pieces of ``word`` alone, as a lexicon spells it (the first starts with the boundary)."""
        return self.encode(word)


def train_sentencepiece(texts: Iterable[str], size: int, model_type: str = "unigram") -> bytes:
    """A sentencepiece model of ``size`` pieces (``<unk>`` included) trained on ``texts`` (normalised
    transcripts), serialised: deterministic for the same texts (one thread, no sampling of the input).

    Characters are kept as they are (identity normalisation, full character coverage), so every
    character of the transcripts is a piece and no transcript needs ``<unk>``.
    """
    import sentencepiece

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"vocab.model_type must be 'unigram' or 'bpe', got {model_type!r}")
    writer = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=writer, vocab_size=size, model_type=model_type,
            character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as error:
        raise ValueError(f"sentencepiece could not train {size} pieces on these transcripts: {error}") from None
    return writer.getvalue()


def make_vocab(kind: str, symbols: Sequence[str] | None = None, model_proto: bytes | None = None
               ) -> "CharVocab | SentencePieceVocab":
    """The vocabulary of ``kind`` (one of :data:`VOCAB_KINDS`) from what a checkpoint or an export holds."""
    if kind == "characters":
        return CharVocab(list(symbols) if symbols is not None else None)
    if kind == "sentencepiece":
        return SentencePieceVocab(symbols, model_proto)
    raise ValueError(f"unknown vocabulary kind {kind!r}; kinds: {VOCAB_KINDS}")


class GreedyDecoder:
    """Best-path (greedy CTC) decoding for a batch of streams, whole utterances or chunk by chunk.

    It keeps the last frame's arg-max per stream, so a character repeated across a chunk boundary is
    merged exactly as it would be inside one chunk. ``frames[b]`` counts the frames stream ``b`` has seen.
    """

    def __init__(self, vocab: "CharVocab | SentencePieceVocab", batch_size: int):
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
