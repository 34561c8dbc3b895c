"""General English word sequences for the synthetic corpus: a bigram chain over web word counts.

A handful of sentence templates teaches a recogniser those templates; a model trained on them fails on other
text. The counts of the ``wordsegment`` package (unigrams and bigrams of Google's web corpus) give word sequences
with the vocabulary and the local statistics of general written English, without a download: a walk along
the bigram chain, each next word drawn in proportion to its bigram count raised to ``SHARPNESS`` (below 1 to
spread the draws over more of the vocabulary). Web counts include offensive words: every word that is on, or
begins with a word of four letters or more on, ``better_profanity``'s word list is left out of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import wordsegment

VOCABULARY_SIZE = 40_000
SHARPNESS = 0.6
# Start words drawn from unigram counts raised to this power (flatter than the counts: more varied openings).
START_SHARPNESS = 0.5
MIN_WORDS, MAX_WORDS = 5, 18
# Blocked words at least this long also block the words they begin (plurals, "-ing" forms).
BLOCKED_PREFIX_LETTERS = 4


def blocked_words() -> tuple[frozenset[str], tuple[str, ...]]:
    """Offensive words (lower case) and the prefixes that block every word they begin."""
    text = (resources.files("better_profanity") / "profanity_wordlist.txt").read_text(encoding="utf-8")
    words = frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and " " not in w.strip())
    return words, tuple(sorted(w for w in words if len(w) >= BLOCKED_PREFIX_LETTERS and w.isalpha()))


def is_blocked(word: str, blocked: frozenset[str], prefixes: tuple[str, ...]) -> bool:
    return word in blocked or word.startswith(prefixes)


@dataclass(frozen=True)
class BigramChain:
    """Successors of each word in CSR form: ``next_words[offsets[i]:offsets[i + 1]]`` follow ``words[i]``
    with probabilities ``next_probs[...]``; ``start_probs`` (one per word) weights the first word."""

    words: np.ndarray
    offsets: np.ndarray
    next_words: np.ndarray
    next_probs: np.ndarray
    start_probs: np.ndarray

    @classmethod
    def from_wordsegment(cls, vocabulary_size: int = VOCABULARY_SIZE) -> "BigramChain":
        """The chain over the ``vocabulary_size`` most frequent dictionary words (letters only, none blocked)."""
        folder = Path(wordsegment.__file__).parent
        dictionary = set((folder / "words.txt").read_text().split())
        blocked, prefixes = blocked_words()
        counts: dict[str, float] = {}
        for line in (folder / "unigrams.txt").read_text().splitlines():
            word, count = line.split("\t")
            if word.isalpha() and word in dictionary and not is_blocked(word, blocked, prefixes):
                counts[word] = float(count)
        vocabulary = sorted(counts, key=counts.__getitem__, reverse=True)[:vocabulary_size]
        index = {word: i for i, word in enumerate(vocabulary)}
        pairs: list[tuple[int, int, float]] = []
        for line in (folder / "bigrams.txt").read_text().splitlines():
            pair, count = line.rsplit("\t", 1)
            first, _, second = pair.partition(" ")
            if first in index and second in index:
                pairs.append((index[first], index[second], float(count)))
        pairs.sort()
        firsts = np.array([p[0] for p in pairs], dtype=np.int64)
        offsets = np.searchsorted(firsts, np.arange(len(vocabulary) + 1))
        weights = np.array([p[2] for p in pairs]) ** SHARPNESS
        sums = np.add.reduceat(weights, offsets[:-1][np.diff(offsets) > 0])
        has_next = np.diff(offsets) > 0
        totals = np.zeros(len(vocabulary))
        totals[has_next] = sums
        probs = weights / np.repeat(totals, np.diff(offsets))
        start = np.array([counts[w] for w in vocabulary]) ** START_SHARPNESS * has_next
        return cls(np.array(vocabulary), offsets, np.array([p[1] for p in pairs], dtype=np.int64), probs,
                   start / start.sum())

    def sentence(self, rng: np.random.Generator) -> str:
        """One sentence of ``MIN_WORDS`` to ``MAX_WORDS`` words (fewer where the chain ends), capitalised."""
        length = int(rng.integers(MIN_WORDS, MAX_WORDS, endpoint=True))
        word = int(rng.choice(len(self.words), p=self.start_probs))
        out = [word]
        while len(out) < length:
            lo, hi = self.offsets[word], self.offsets[word + 1]
            if lo == hi:
                break
            word = int(self.next_words[lo + rng.choice(hi - lo, p=self.next_probs[lo:hi])])
            out.append(word)
        text = " ".join(self.words[out])
        return text[0].upper() + text[1:] + "."
