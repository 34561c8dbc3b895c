"""Lexicon-constrained CTC beam search with a word language model and hotwords (flashlight-text's decoder).

Greedy CTC writes down what each frame sounds like; a small model hears the sounds and misspells most words
("ABUT FIR ICIXPECSENT OFTHE PEPE"). The beam search only writes words of a lexicon, scoring each hypothesis
by its acoustic log-probability plus ``lm_weight`` times the log-probability (natural log) of its words plus
``word_score`` per word. Two language models:

- **unigram** (no ``lm``): the lexicon and the word probabilities come from ``wordfreq`` (frequencies of
  general English measured over Wikipedia, subtitles, news, books and web text);
- **n-gram** (``lm``: an ARPA file, e.g. from ``streamssl lm build``, :mod:`streamssl.asr.lm`): the lexicon
  is the file's words, scored by flashlight-text's KenLM.

Both are sources apart from the synthetic corpus' text (walks along ``wordsegment``'s bigram counts,
:mod:`streamssl.data.prose`), so the demo's test split does not flatter them. Words outside the lexicon
cannot be written, except hotwords.

**Hotwords** (context biasing): phrases of one or more words given per stream. Words of a phrase that are
not in the lexicon are added to it (with the language model's ``<unk>`` probability); every word that
continues a phrase earns ``hotword_boost`` (added to its LM log-probability, so weighed by ``lm_weight``);
a phrase left unfinished gives its earned boost back, so only whole phrases gain. A share of the boost
(``hotword_lookahead``) is in the spelling trie's look-ahead, so that a boosted word is not pruned before
it ends; the whole boost there let a hypothesis spelling a boosted prefix push the others out of the beam
(``docs/decoding.md``).

**Streaming.** The decoder is frame-synchronous: fed chunk by chunk (:meth:`LexiconDecoder.push`) it keeps
the same beam as when fed a whole utterance, so streamed transcripts equal offline ones. A word of the best
hypothesis is *stable* (final, :meth:`LexiconDecoder.hypothesis`) once every hypothesis scoring within
``stable_margin`` of the best has it too. With an infinite margin that is every hypothesis of the beam:
every later hypothesis extends one of them, so the words cannot change. With a finite margin, a hypothesis
further behind may disagree, so the search is constrained to the stable words: the word LM gives a
hypothesis that writes another word at a stable word's place (or ends without one) a score no other can
fall below (:data:`DISAGREE_LOG_PROB`), and the best hypothesis reported is the best that agrees. Then the
stable words depend on when the rule was applied, so it is applied after every frame, never at the ends of
pushes: any chunking gives the same search, and still streamed equals offline. Once every hypothesis has
written the stable words by the frame where the best one did, the history before that frame is pruned
(flashlight's ``prune``), which bounds memory and work by the unstable stretch; pruning alone, at fixed
look-backs, would commit to the best path so far and change transcripts. Usage::

    decoder = LexiconDecoder(model.vocab, batch_size, BeamSearchConfig(lm="lm.arpa"), hotwords=[("ZANZIBAR",)])
    decoder.push(log_probs, lengths)       # (B, m, V) newly final frames, any number of times
    words, stable = decoder.hypothesis(0)  # best hypothesis so far; its first `stable` words are final
    decoder.finish()
    decoder.texts()
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
from flashlight.lib.text import decoder as fl

from streamssl.asr.vocab import CharVocab, SentencePieceVocab, make_vocab, split_word_start
from streamssl.asr.lm import UNKNOWN, arpa_words, english_words
from streamssl.data.text import normalize_text

LN10 = math.log(10)
# The word LM's log-probability for a word that contradicts a stable word: far below any real score, so the
# beam drops the hypothesis at once whenever one that agrees is left, yet finite, so that a beam where none
# agrees (possible in principle, never seen) still ends with a hypothesis (see LexiconDecoder._report).
DISAGREE_LOG_PROB = -1e9


@dataclass(frozen=True)
class BeamSearchConfig:
    """Options of the lexicon beam search.

    ``lexicon_words``: without ``lm``, the most frequent English words (``wordfreq``) the decoder may write.
    ``lm``: an ARPA word n-gram model (its words are then the lexicon); ``None``: the wordfreq unigram LM.
    ``lm_weight``: weight of the word log-probability (natural log) against the acoustic score.
    ``word_score``: added per written word (negative: fewer, longer words).
    ``beam_size``: hypotheses kept per frame; ``beam_size_token``: tokens tried per hypothesis and frame;
    ``beam_threshold``: hypotheses scoring this far below the best are dropped.
    ``hotword_boost``: added to the LM log-probability of each word that continues a hotword phrase;
    ``hotword_lookahead``: the share of it the letters of a hotword already earn (the trie's look-ahead).
    ``stable_margin``: a word is stable (final) once every hypothesis scoring within this much of the best
    (natural log, the search's score) has it; ``math.inf``: once every hypothesis of the beam has it (the
    search is then never constrained). A finite margin needs ``lm_weight > 0`` (the constraint is an LM score).
    The defaults were chosen on the demo's dev split (``docs/results.md``, ``docs/decoding.md``).
    """

    lexicon_words: int = 50_000
    lm: str | None = None
    lm_weight: float = 0.5
    word_score: float = -1.0
    beam_size: int = 64
    beam_size_token: int = 12
    beam_threshold: float = 20.0
    hotword_boost: float = 40.0
    hotword_lookahead: float = 0.75
    stable_margin: float = math.inf

    def __post_init__(self):
        for name in ("lexicon_words", "beam_size", "beam_size_token"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lm_weight", "word_score", "beam_threshold", "hotword_boost", "hotword_lookahead"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        if self.lm_weight < 0 or self.beam_threshold <= 0:
            raise ValueError(f"lm_weight must be >= 0 and beam_threshold > 0, got {self.lm_weight!r} and "
                             f"{self.beam_threshold!r}")
        if self.hotword_boost < 0:
            raise ValueError(f"hotword_boost must be >= 0, got {self.hotword_boost!r}")
        if not 0 <= self.hotword_lookahead <= 1:
            raise ValueError(f"hotword_lookahead must be in [0, 1], got {self.hotword_lookahead!r}")
        if not self.stable_margin >= 0:
            raise ValueError(f"stable_margin must be >= 0 (math.inf: every hypothesis agrees), got "
                             f"{self.stable_margin!r}")
        if math.isfinite(self.stable_margin) and self.lm_weight == 0:
            raise ValueError("a finite stable_margin needs lm_weight > 0: the beam is kept to the stable words "
                             "through the LM score")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodedWord:
    """A word of a hypothesis: its output frames (``first_frame``: its first letter's, ``last_frame``: its
    last letter's, counting from the stream's first frame) and ``confidence``, the lowest probability the
    model gave any of its letters at the frame the path writes it (a letter the lexicon corrected scores low)."""

    text: str
    first_frame: int
    last_frame: int
    confidence: float


Hotwords = tuple[tuple[str, ...], ...]


def parse_hotwords(lines: Iterable[str]) -> Hotwords:
    """Hotword phrases from lines of text (one phrase a line, normalised like transcripts; blank lines and
    lines starting with ``#`` are skipped). A ``ValueError`` names a line that cannot be spelt."""
    phrases: list[tuple[str, ...]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = tuple(normalize_text(line).split())
        except ValueError as error:
            raise ValueError(f"hotword line {number} ({line.strip()[:40]!r}): {error}") from None
        if words and words not in phrases:
            phrases.append(words)
    return tuple(phrases)


class _Unigram:
    """Word log-probabilities that do not depend on the history; an added word gets the rarest one's."""

    order = 1

    def __init__(self, log_probs: tuple[float, ...]):
        self.log_probs = log_probs
        self.unknown_log_prob = min(log_probs)

    def start(self) -> None:
        return None

    def score(self, state: None, word: int) -> tuple[None, float]:
        return None, self.log_probs[word] if word < len(self.log_probs) else self.unknown_log_prob

    def finish(self, state: None) -> float:
        return 0.0


class _Ngram:
    """An ARPA model through flashlight-text's KenLM; scores in natural log. Word ids past the lexicon
    (added hotwords) are KenLM's ``<unk>``."""

    def __init__(self, path: str, words: tuple[str, ...], order: int, unknown_log10: float):
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary

        self.order = order
        self.unknown = len(words)
        self.unknown_log_prob = unknown_log10 * LN10
        self.kenlm = KenLM(path, Dictionary([*words, UNKNOWN]))

    def start(self) -> fl.LMState:
        return self.kenlm.start(False)

    def score(self, state: fl.LMState, word: int) -> tuple[fl.LMState, float]:
        state, log10_prob = self.kenlm.score(state, min(word, self.unknown))
        return state, log10_prob * LN10

    def finish(self, state: fl.LMState) -> float:
        return self.kenlm.finish(state)[1] * LN10


class _Phrases:
    """Hotword phrases as word-id tuples: which word sequences continue one, and what is owed when one breaks."""

    def __init__(self, phrases: Iterable[tuple[int, ...]]):
        phrases = set(phrases)
        self.complete = phrases
        self.prefixes = {p[:i] for p in phrases for i in range(1, len(p) + 1)}
        self.proper = {p[:i] for p in phrases for i in range(1, len(p))}

    def unfinished(self, prefix: tuple[int, ...]) -> int:
        """Words of ``prefix`` past its longest complete phrase: boosts to give back if it breaks here."""
        banked = max((i for i in range(1, len(prefix) + 1) if prefix[:i] in self.complete), default=0)
        return len(prefix) - banked

    def step(self, prefix: tuple[int, ...], word: int) -> tuple[int, tuple[int, ...]]:
        """``(boosts earned, new prefix)`` when ``word`` follows the matched ``prefix``."""
        extended = prefix + (word,)
        if extended in self.prefixes:
            return 1, extended if extended in self.proper else ()
        owed = -self.unfinished(prefix)
        if (word,) in self.prefixes:
            return owed + 1, (word,) if (word,) in self.proper else ()
        return owed, ()


_DISAGREES = -1  # the ``checked`` count of a hypothesis that contradicted a stable word


class _WordLM(fl.LM):
    """The decoder's LM: an inner word model plus hotword boosts, and, when ``constrain``, the stable words.

    flashlight merges hypotheses whose LM states are the same object, so there is one state per
    ``(last order-1 words, matched hotword prefix, checked, unchecked)``; the inner model's score depends on
    nothing else. ``stable`` holds the labels of the segment's stable words (the decoder appends to it);
    ``checked`` is the position of a hypothesis' first word not yet compared with them (or ``_DISAGREES``),
    ``unchecked`` its last words from there on, at most order-1 of them (one for a unigram LM), the words
    the LM tells apart already: keeping more would keep apart
    hypotheses the plain search merges (the same last words, another word long before), and the beam would
    fill with near-copies that disagree on an old word. A word dropped unchecked is taken to agree, so a
    hypothesis that disagrees may survive the LM; the decoder never reports one (``LexiconDecoder._best``).
    Without ``constrain`` both stay ``0, ()``, so the states, and the search, are those of the plain LM.
    """

    def __init__(self, inner: _Unigram | _Ngram, phrases: _Phrases, boost: float, constrain: bool):
        fl.LM.__init__(self)
        self.inner = inner
        self.phrases = phrases
        self.boost = boost
        self.constrain = constrain
        self.stable: list[int] = []
        self._history = max(inner.order - 1, 0)
        self._checkable = max(self._history, 1)
        self._unknown = getattr(inner, "unknown", None)
        self._states: dict[tuple, fl.LMState] = {}
        self._info: dict[fl.LMState, tuple] = {}

    def _state(self, history: tuple[int, ...], prefix: tuple[int, ...], checked: int, unchecked: tuple[int, ...],
               inner: object) -> fl.LMState:
        key = (history, prefix, checked, unchecked)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = fl.LMState()
            self._info[state] = (history, prefix, checked, unchecked, inner)
        return state

    def start(self, start_with_nothing: bool) -> fl.LMState:
        return self._state((), (), 0, (), self.inner.start())

    def forget(self) -> None:
        """Drop every state and the stable words: the search that used them ended (an endpoint), and the
        next one starts afresh."""
        self._states.clear()
        self._info.clear()
        self.stable = []

    def _check(self, checked: int, unchecked: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """Compare a hypothesis' unchecked words with the stable words known by now."""
        while unchecked and checked < len(self.stable):
            if unchecked[0] != self.stable[checked]:
                return _DISAGREES, ()
            checked, unchecked = checked + 1, unchecked[1:]
        return checked, unchecked

    def score(self, state: fl.LMState, word: int) -> tuple[fl.LMState, float]:
        history, prefix, checked, unchecked, inner = self._info[state]
        inner, log_prob = self.inner.score(inner, word)
        boosts, prefix = self.phrases.step(prefix, word) if self.phrases.prefixes else (0, ())
        if self._history:
            lm_word = word if self._unknown is None else min(word, self._unknown)
            history = (history + (lm_word,))[-self._history:]
        if self.constrain and checked != _DISAGREES:
            checked, unchecked = self._check(checked, unchecked + (word,))
            if checked == _DISAGREES:
                log_prob = DISAGREE_LOG_PROB
            elif len(unchecked) > self._checkable:
                checked, unchecked = checked + 1, unchecked[1:]
        return self._state(history, prefix, checked, unchecked, inner), log_prob + self.boost * boosts

    def finish(self, state: fl.LMState) -> tuple[fl.LMState, float]:
        history, prefix, checked, unchecked, inner = self._info[state]
        log_prob = self.inner.finish(inner) - self.boost * self.phrases.unfinished(prefix)
        # a hypothesis that ends before a stable word, or contradicts one it has not been checked against
        if self.constrain and checked != _DISAGREES:
            checked, unchecked = self._check(checked, unchecked)
            if checked == _DISAGREES or checked < len(self.stable):
                log_prob = DISAGREE_LOG_PROB
        return state, log_prob


@lru_cache(maxsize=4)
def _base_graph(lm: str | None, n_words: int, letters: str) -> tuple[tuple[str, ...], tuple[float, ...],
                                                                      _Unigram | _Ngram]:
    """The lexicon's words, their unigram log-probabilities (natural log) and the inner LM; loaded once
    per process (about a second) and shared by every decoder, which only reads them."""
    if lm is None:
        words, log_probs = english_words(n_words, letters)
        return words, log_probs, _Unigram(log_probs)
    order, all_words, log10_probs, unknown_log10 = arpa_words(lm)
    allowed = set(letters)
    kept = [(w, p) for w, p in zip(all_words, log10_probs) if set(w) <= allowed]
    if not kept:
        raise ValueError(f"{lm}: no word of the language model is spelt with this model's letters")
    words = tuple(w for w, _ in kept)
    return words, tuple(p * LN10 for _, p in kept), _Ngram(lm, words, order, unknown_log10)


@lru_cache(maxsize=16)
def _search_graph(lm: str | None, n_words: int, vocab_key: tuple[str, tuple[str, ...], bytes | None],
                  hotwords: Hotwords, lookahead_boost: float
                  ) -> tuple[dict[int, str], int, _Unigram | _Ngram, _Phrases, fl.Trie]:
    """The words by label (the lexicon's ``0..n-1``, then added hotwords after the reserved ``<unk>`` label
    ``n``), ``n``, the inner LM, the hotword phrases as labels and the spelling trie (each word spelt by
    ``vocab.spell``: its letters and a space, or its sentencepiece pieces; scored by its boosted unigram
    log-probability). ``vocab_key``: the vocabulary's kind, symbols and sentencepiece model."""
    vocab = make_vocab(*vocab_key)
    space = vocab.separator
    letters = vocab.letters
    base_words, base_log_probs, inner = _base_graph(lm, n_words, letters)
    for phrase in hotwords:
        for word in phrase:
            if not set(word) <= set(letters):
                raise ValueError(f"hotword {word!r} cannot be spelt with this model's letters {letters!r}")
    unknown = len(base_words)
    label_of = {w: i for i, w in enumerate(base_words)}
    added = [w for w in dict.fromkeys(w for phrase in hotwords for w in phrase) if w not in label_of]
    label_of.update({w: unknown + 1 + i for i, w in enumerate(added)})
    log_prob_of = dict(zip(base_words, base_log_probs)) | {w: inner.unknown_log_prob for w in added}
    boosted = {w for phrase in hotwords for w in phrase}
    trie = fl.Trie(len(vocab), space)
    for word, label in label_of.items():
        trie.insert(vocab.spell(word), label,
                    log_prob_of[word] + (lookahead_boost if word in boosted else 0.0))
    trie.smear(fl.SmearingMode.MAX)
    phrases = _Phrases(tuple(label_of[w] for w in phrase) for phrase in hotwords)
    return {label: w for w, label in label_of.items()}, unknown, inner, phrases, trie


@dataclass
class _Path:
    """A hypothesis read off flashlight's arrays: its words' ids and the array index that wrote each."""

    score: float
    word_ids: list[int]
    emitted_at: list[int]
    tokens: list[int]


def _agrees(words: Sequence[int], stable: Sequence[int]) -> bool:
    """Whether a hypothesis' words contradict none of the stable words (it may not have reached them all)."""
    return all(mine == theirs for mine, theirs in zip(words, stable))


class LexiconDecoder:
    """Lexicon beam search for a batch of streams, whole utterances or chunk by chunk.

    ``vocab``: characters with a space symbol (the word boundary), or sentencepiece pieces (with the model
    that spells the lexicon's words); ``batch_size`` streams are decoded independently,
    each with the ``hotwords`` phrases (tuples of upper-case words, see :func:`parse_hotwords`).
    ``fallbacks`` counts the times a finite ``stable_margin`` left no hypothesis in a beam that agreed with
    the stable words (the words shown were then the stable ones, then the best hypothesis' later words).
    """

    def __init__(self, vocab: CharVocab | SentencePieceVocab, batch_size: int, config: BeamSearchConfig | None = None,
                 hotwords: Sequence[Sequence[str]] = ()):
        if vocab.kind == "characters" and vocab.word_boundary not in vocab.index:
            raise ValueError(f"lexicon decoding needs a space symbol in the vocabulary, got {vocab.symbols}")
        self.vocab = vocab
        self.config = config or BeamSearchConfig()
        self.hotwords: Hotwords = tuple(tuple(w.upper() for w in phrase) for phrase in hotwords if phrase)
        self._labels, unknown, inner, phrases, self._trie = _search_graph(
            self.config.lm, self.config.lexicon_words,
            (vocab.kind, tuple(vocab.symbols), getattr(vocab, "model_proto", None)), self.hotwords,
            self.config.hotword_boost * self.config.hotword_lookahead)
        self.words = tuple(self._labels.values())
        space = vocab.separator
        options = fl.LexiconDecoderOptions(
            beam_size=self.config.beam_size, beam_size_token=self.config.beam_size_token,
            beam_threshold=self.config.beam_threshold, lm_weight=self.config.lm_weight,
            word_score=self.config.word_score, unk_score=-math.inf, sil_score=0.0, log_add=False,
            criterion_type=fl.CriterionType.CTC)
        self._constrained = math.isfinite(self.config.stable_margin)
        self._lms = [_WordLM(inner, phrases, self.config.hotword_boost, self._constrained) for _ in range(batch_size)]
        self._decoders = [fl.LexiconDecoder(options, self._trie, lm, space, vocab.blank, unknown, [], False)
                          for lm in self._lms]
        for decoder in self._decoders:
            decoder.decode_begin()
        self.frames = [0] * batch_size
        self.fallbacks = 0
        self._finished = [False] * batch_size
        # Per stream: frame of array index 1 of flashlight's buffer (it moves on at each prune), the words
        # committed before it (and how many of them are this segment's), the best hypothesis after it, how
        # many of those are stable, the stable ones as they were written when they became stable, and the
        # emissions from the buffer's start on (for confidences). The stable words' labels are the LM's.
        self._origin = [0] * batch_size
        self._committed: list[list[DecodedWord]] = [[] for _ in range(batch_size)]
        self._segment_committed = [0] * batch_size
        self._open: list[list[DecodedWord]] = [[] for _ in range(batch_size)]
        self._open_stable = [0] * batch_size
        self._stable_words: list[list[DecodedWord]] = [[] for _ in range(batch_size)]
        self._spelling = [""] * batch_size
        self._rows: list[list[np.ndarray]] = [[] for _ in range(batch_size)]
        self._rows_from = [0] * batch_size

    def push(self, log_probs: Any, lengths: Any = None) -> None:
        """Feed ``log_probs`` ``(B, m, V)`` of newly final frames (the first ``lengths[b]`` of row ``b``): a
        numpy array or a torch tensor (read on the CPU as float32); ``lengths`` ``(B,)`` likewise."""
        if log_probs.shape[0] != len(self._decoders) or log_probs.shape[-1] != len(self.vocab):
            raise ValueError(f"log_probs of shape {tuple(log_probs.shape)} do not fit {len(self._decoders)} streams "
                             f"of a {len(self.vocab)}-symbol vocabulary")
        emissions = _float32_rows(log_probs)
        counts = [emissions.shape[1]] * len(self._decoders) if lengths is None else lengths.tolist()
        for b, (decoder, count) in enumerate(zip(self._decoders, counts)):
            if count == 0:
                continue
            if self._finished[b]:
                raise ValueError(f"stream {b} was finished; it takes no more frames")
            row = emissions[b, :count]
            self._rows[b].append(row.copy())
            # A constrained search depends on when words became stable: decide after every frame, so that
            # the search does not depend on how the frames were chunked.
            steps = [(t, 1) for t in range(count)] if self._constrained else [(0, count)]
            for start, frames in steps:
                decoder.decode_step(row[start:].ctypes.data, frames, row.shape[1])
                self.frames[b] += frames
                paths = self._settle(b)
            self._report(b, paths)

    def finish(self) -> None:
        """End every stream: the words still open at the last frame are closed and scored; all are final."""
        for b, decoder in enumerate(self._decoders):
            if not self._finished[b]:
                decoder.decode_end()
                self._finished[b] = True
                self._report(b, self._paths(b), final=True)

    def end_segment(self, b: int) -> None:
        """End stream ``b``'s segment here (an endpoint): its words are closed, scored and final, and the
        search starts afresh (a new sentence for the LM) with the next frame."""
        if self._finished[b]:
            raise ValueError(f"stream {b} was finished")
        decoder = self._decoders[b]
        decoder.decode_end()
        self._report(b, self._paths(b), final=True)
        self._committed[b] += self._open[b]
        self._open[b], self._open_stable[b], self._spelling[b], self._stable_words[b] = [], 0, "", []
        self._segment_committed[b] = 0
        self._lms[b].forget()
        decoder.decode_begin()
        self._origin[b] = self._rows_from[b] = self.frames[b]
        self._rows[b] = []

    def hypothesis(self, b: int) -> tuple[list[DecodedWord], int]:
        """Stream ``b``'s best hypothesis so far and how many of its first words are stable (final)."""
        return self._committed[b] + self._open[b], len(self._committed[b]) + self._open_stable[b]

    def spelling(self, b: int) -> str:
        """The letters the best hypothesis has written of the word it is in (not yet a word)."""
        return self._spelling[b]

    def texts(self) -> list[str]:
        """Transcripts: final for finished streams, the best hypothesis so far for the others."""
        return [" ".join(w.text for w in self.hypothesis(b)[0]) for b in range(len(self._decoders))]

    # ------------------------------------------------------------ stable words and pruning
    def _paths(self, b: int) -> list[_Path]:
        """The beam's hypotheses, in flashlight's order."""
        paths = []
        for result in self._decoders[b].get_all_final_hypothesis():
            words = result.words
            emitted = [i for i, w in enumerate(words) if w >= 0]
            paths.append(_Path(result.score, [words[i] for i in emitted], emitted, result.tokens))
        return paths

    def _stable_labels(self, b: int) -> list[int]:
        """The labels of the stable words after the committed ones."""
        return self._lms[b].stable[self._segment_committed[b]:]

    @staticmethod
    def _best(paths: list[_Path], stable: list[int]) -> _Path | None:
        """The best hypothesis that agrees with the stable words (ties: the first, as flashlight's prune takes)."""
        agreeing = [i for i, p in enumerate(paths) if _agrees(p.word_ids, stable)]
        return paths[max(agreeing, key=lambda i: (paths[i].score, -i))] if agreeing else None

    def _settle(self, b: int) -> list[_Path]:
        """Extend the stable words after a step, and prune the history where every hypothesis agrees;
        returns the beam's hypotheses (read after the prune)."""
        paths = self._paths(b)
        stable = self._stable_labels(b)
        best = self._best(paths, stable)
        if best is None:
            return paths
        floor = best.score - self.config.stable_margin
        agreed = len(best.word_ids)
        for path in paths:
            if path.score >= floor and _agrees(path.word_ids, stable):
                common = 0
                for mine, theirs in zip(best.word_ids, path.word_ids):
                    if mine != theirs:
                        break
                    common += 1
                agreed = min(agreed, common)
        if agreed > len(stable):
            self._lms[b].stable += best.word_ids[len(stable):agreed]
            self._stable_words[b] = self._words_of(b, best)[:agreed]
        return self._prune(b, paths, best, max(agreed, len(stable)))

    def _prune(self, b: int, paths: list[_Path], best: _Path, stable: int) -> list[_Path]:
        """Prune after the last stable word that every hypothesis has, written no later than the best one
        did, and no later word before it (flashlight prunes back to the frame after a word of the best path),
        if frames follow that frame: flashlight keeps the frame it prunes back to as its buffer's start, and
        a buffer of only a start has no hypotheses to read until the next frame is decoded."""
        buffer_end = len(best.tokens) - 1
        cut = 0
        for j in range(min(stable, len(best.word_ids)), 0, -1):
            at = best.emitted_at[j - 1]
            if at + 1 < buffer_end and all(
                    p.word_ids[:j] == best.word_ids[:j] and p.emitted_at[j - 1] <= at
                    and (len(p.emitted_at) == j or p.emitted_at[j] > at) for p in paths):
                cut = j
                break
        if not cut:
            return paths
        words = self._words_of(b, best)  # read before the prune drops the frames they were written at
        prune_index = best.emitted_at[cut - 1] + 1
        self._decoders[b].prune(buffer_end - prune_index)
        self._committed[b] += words[:cut]
        self._segment_committed[b] += cut
        self._stable_words[b] = self._stable_words[b][cut:]
        self._origin[b] += prune_index
        self._trim_rows(b, self._origin[b] - 1)
        return self._paths(b)

    def _report(self, b: int, paths: list[_Path], final: bool = False) -> None:
        """Set stream ``b``'s best hypothesis after the committed words, and its stable count and spelling."""
        stable = self._stable_labels(b)
        best = self._best(paths, stable)
        spelling = ""
        if best is None:
            # no hypothesis agrees any more: keep the stable words and show what the best one says after them
            self.fallbacks += 1
            last = self._stable_words[b][-1].last_frame
            overall = max(paths, key=lambda p: p.score)
            words = self._stable_words[b] + [w for w in self._words_of(b, overall) if w.first_frame > last]
        elif len(best.word_ids) < len(stable):  # it has not written every stable word yet
            words = list(self._stable_words[b])
        else:
            words = self._words_of(b, best)
            space = self.vocab.separator
            start = best.emitted_at[-1] + 1 if best.emitted_at else 0
            letters = [t for i, t in enumerate(best.tokens[start:], start=start)
                       if t not in (self.vocab.blank, space) and t != (best.tokens[i - 1] if i else space)]
            spelling = "".join(split_word_start(self.vocab.symbols[t], self.vocab.word_boundary)[1]
                                   for t in letters)
        self._open[b] = words
        self._open_stable[b] = len(words) if final else len(stable)
        self._spelling[b] = "" if final else spelling

    def _trim_rows(self, b: int, frame: int) -> None:
        """Drop the emissions of frames before ``frame`` (no word can start there any more)."""
        rows = np.concatenate(self._rows[b]) if len(self._rows[b]) > 1 else self._rows[b][0]
        drop = max(0, frame - self._rows_from[b])
        self._rows[b] = [rows[drop:]]
        self._rows_from[b] += drop

    def _words_of(self, b: int, path: _Path) -> list[DecodedWord]:
        """The words of hypothesis ``path`` (read off flashlight's arrays, which start at the buffer's
        start; its ``get_best_hypothesis`` would stop at the last word boundary), with their letters'
        frames and confidences."""
        tokens = path.tokens
        rows = np.concatenate(self._rows[b]) if len(self._rows[b]) > 1 else (self._rows[b][0] if self._rows[b] else None)
        space, blank = self.vocab.separator, self.vocab.blank
        words: list[DecodedWord] = []
        letters: list[tuple[int, int]] = []
        emitted = dict(zip(path.emitted_at, path.word_ids))
        # Index 0 is the start, or after a prune the frame after a word of this path: a letter there is new.
        for i in range(len(tokens)):
            frame = self._origin[b] + i - 1
            token = tokens[i]
            previous = tokens[i - 1] if i else space
            if 0 <= frame < self.frames[b] and token not in (blank, space) and token != previous:
                letters.append((frame, token))
            if i in emitted:
                label = emitted[i]
                probabilities = [math.exp(float(rows[f - self._rows_from[b], t])) for f, t in letters] or [1.0]
                first = letters[0][0] if letters else frame
                last = letters[-1][0] if letters else frame
                words.append(DecodedWord(self._labels[label], first, last, min(probabilities)))
                letters = []
        return words


def _float32_rows(log_probs: Any) -> np.ndarray:
    """``log_probs`` as a C-contiguous float32 numpy array (flashlight reads its memory); a torch tensor is
    taken off its graph and device without importing torch here."""
    if hasattr(log_probs, "detach"):
        log_probs = log_probs.detach().cpu().float().numpy()
    return np.ascontiguousarray(log_probs, dtype=np.float32)
