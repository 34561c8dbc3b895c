"""Lexicon-constrained CTC beam search with a unigram word language model (flashlight-text's decoder).

Greedy CTC writes down what each frame sounds like; a small model hears the sounds and misspells most words
("ABUT FIR ICIXPECSENT OFTHE PEPE"). The beam search only writes words of a lexicon, scoring each hypothesis
by its acoustic log-probability plus ``lm_weight`` times the log-probability of its words plus ``word_score``
per word. The lexicon and the word probabilities come from ``wordfreq`` (frequencies of general English
measured over Wikipedia, subtitles, news, books and web text), a source apart from the synthetic corpus'
text (walks along ``wordsegment``'s bigram counts, :mod:`streamssl.data.prose`), so the demo's test split
does not flatter the language model. Words outside the lexicon cannot be written.

The decoder is frame-synchronous: fed chunk by chunk (:meth:`LexiconDecoder.push`) it keeps the same beam as
when fed a whole utterance, so streamed transcripts equal offline ones. It keeps every frame's beam until
``finish``: flashlight's ``prune`` would bound that memory, but it commits to the best path so far, which
changed 17 of 40 dev transcripts even when looking 100 frames back. Usage::

    decoder = LexiconDecoder(model.vocab, batch_size, BeamSearchConfig())
    decoder.push(log_probs, lengths)       # (B, m, V) newly final frames, any number of times
    decoder.finish()
    decoder.texts()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import wordfreq
from flashlight.lib.text import decoder as fl
from torch import Tensor

from streamssl.asr.ctc import CharVocab


@dataclass(frozen=True)
class BeamSearchConfig:
    """Options of the lexicon beam search.

    ``lexicon_words``: the most frequent English words (``wordfreq``) the decoder may write.
    ``lm_weight``: weight of the word log-probability (natural log) against the acoustic score.
    ``word_score``: added per written word (negative: fewer, longer words).
    ``beam_size``: hypotheses kept per frame; ``beam_size_token``: tokens tried per hypothesis and frame;
    ``beam_threshold``: hypotheses scoring this far below the best are dropped.
    The defaults were chosen on the demo's dev split (``docs/results.md``).
    """

    lexicon_words: int = 50_000
    lm_weight: float = 0.5
    word_score: float = -1.0
    beam_size: int = 64
    beam_size_token: int = 12
    beam_threshold: float = 20.0

    def __post_init__(self):
        for name in ("lexicon_words", "beam_size", "beam_size_token"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lm_weight", "word_score", "beam_threshold"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        if self.lm_weight < 0 or self.beam_threshold <= 0:
            raise ValueError(f"lm_weight must be >= 0 and beam_threshold > 0, got {self.lm_weight!r} and "
                             f"{self.beam_threshold!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def english_lexicon(n_words: int, letters: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The ``n_words`` most frequent English words spelt only with ``letters`` (upper case), and their
    unigram log-probabilities (natural log, renormalised over these words)."""
    allowed = set(letters.lower())
    words: list[str] = []
    # top_n_list also holds numbers, abbreviations and accented words; ask for enough to keep n_words.
    for word in wordfreq.top_n_list("en", 3 * n_words):
        if set(word) <= allowed and any(c.isalpha() for c in word):
            words.append(word)
            if len(words) == n_words:
                break
    frequencies = [wordfreq.word_frequency(w, "en") for w in words]
    total = sum(frequencies)
    return tuple(w.upper() for w in words), tuple(math.log(f / total) for f in frequencies)


class _UnigramLM(fl.LM):
    """A word's score does not depend on its history, so one state serves every hypothesis."""

    def __init__(self, log_probs: tuple[float, ...]):
        fl.LM.__init__(self)
        self.log_probs = log_probs

    def start(self, start_with_nothing: bool) -> fl.LMState:
        return fl.LMState()

    def score(self, state: fl.LMState, word: int) -> tuple[fl.LMState, float]:
        return state, self.log_probs[word]

    def finish(self, state: fl.LMState) -> tuple[fl.LMState, float]:
        return state, 0.0


@lru_cache(maxsize=4)
def _search_graph(n_words: int, symbols: tuple[str, ...]) -> tuple[tuple[str, ...], _UnigramLM, fl.Trie]:
    """The lexicon's words, their LM and their spelling trie (ending in a space); built once per process
    (about a second for 50 000 words) and shared by every decoder, which only reads them."""
    vocab = CharVocab(list(symbols))
    space = vocab.index[" "]
    letters = "".join(s for s in symbols[1:] if len(s) == 1 and s != " ")
    words, log_probs = english_lexicon(n_words, letters)
    trie = fl.Trie(len(vocab), space)
    for index, (word, log_prob) in enumerate(zip(words, log_probs)):
        trie.insert([vocab.index[c] for c in word] + [space], index, log_prob)
    trie.smear(fl.SmearingMode.MAX)
    return words, _UnigramLM(log_probs), trie


class LexiconDecoder:
    """Lexicon beam search for a batch of streams, whole utterances or chunk by chunk.

    ``vocab`` must have a space symbol (the word boundary); ``batch_size`` streams are decoded independently.
    """

    def __init__(self, vocab: CharVocab, batch_size: int, config: BeamSearchConfig | None = None):
        if " " not in vocab.index:
            raise ValueError(f"lexicon decoding needs a space symbol in the vocabulary, got {vocab.symbols}")
        self.vocab = vocab
        self.config = config or BeamSearchConfig()
        self.words, self._lm, self._trie = _search_graph(self.config.lexicon_words, tuple(vocab.symbols))
        space = vocab.index[" "]
        options = fl.LexiconDecoderOptions(
            beam_size=self.config.beam_size, beam_size_token=self.config.beam_size_token,
            beam_threshold=self.config.beam_threshold, lm_weight=self.config.lm_weight,
            word_score=self.config.word_score, unk_score=-math.inf, sil_score=0.0, log_add=False,
            criterion_type=fl.CriterionType.CTC)
        unknown = len(self.words)
        self._decoders = [fl.LexiconDecoder(options, self._trie, self._lm, space, vocab.blank, unknown, [], False)
                          for _ in range(batch_size)]
        for decoder in self._decoders:
            decoder.decode_begin()
        self.frames = [0] * batch_size
        self._final: list[str | None] = [None] * batch_size

    def push(self, log_probs: Tensor, lengths: Tensor | None = None) -> None:
        """Feed ``log_probs`` ``(B, m, V)`` of newly final frames (the first ``lengths[b]`` of row ``b``)."""
        if log_probs.shape[0] != len(self._decoders) or log_probs.shape[-1] != len(self.vocab):
            raise ValueError(f"log_probs of shape {tuple(log_probs.shape)} do not fit {len(self._decoders)} streams "
                             f"of a {len(self.vocab)}-symbol vocabulary")
        emissions = log_probs.detach().to("cpu", torch.float32).contiguous()
        counts = [emissions.shape[1]] * len(self._decoders) if lengths is None else lengths.tolist()
        for b, (decoder, count) in enumerate(zip(self._decoders, counts)):
            if count == 0:
                continue
            if self._final[b] is not None:
                raise ValueError(f"stream {b} was finished; it takes no more frames")
            row = emissions[b, :count]
            decoder.decode_step(row.data_ptr(), count, row.shape[1])
            self.frames[b] += count

    def finish(self) -> None:
        """End every stream: the words still open at the last frame are closed and scored."""
        for b, decoder in enumerate(self._decoders):
            if self._final[b] is None:
                decoder.decode_end()
                self._final[b] = self._text(decoder)

    def _text(self, decoder) -> str:
        return " ".join(self.words[i] for i in decoder.get_best_hypothesis().words if 0 <= i < len(self.words))

    def texts(self) -> list[str]:
        """Final transcripts of finished streams; the best hypothesis so far of the others."""
        return [final if final is not None else self._text(decoder)
                for final, decoder in zip(self._final, self._decoders)]
