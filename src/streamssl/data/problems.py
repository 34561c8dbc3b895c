"""Corpus problems found by the readers and the checker, and the error that lists them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from streamssl.data.text import describe_characters, normalize_text, unsupported_characters

logger = logging.getLogger("streamssl.data")

# The kinds of problem, with what each means.
PROBLEM_KINDS = {
    "unreadable": "the audio file cannot be opened or decoded (corrupt, truncated, not audio)",
    "zero-length": "the audio file holds no samples",
    "missing-transcript": "an audio file has no transcript",
    "missing-audio": "a transcript (or manifest line) names audio that does not exist",
    "unsupported-characters": "a transcript holds characters outside what normalisation can spell",
    "empty-transcript": "a transcript is empty once normalised",
    "malformed": "a transcript or manifest line cannot be parsed",
    "duplicate-id": "two utterances share an id",
}


@dataclass(frozen=True)
class Problem:
    """One problem with a corpus: the file it concerns, its kind (a key of ``PROBLEM_KINDS``) and details."""

    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.message}"


class CorpusError(ValueError):
    """Raised by loaders when a corpus has problems; ``problems`` lists all of them, and so does the message."""

    def __init__(self, problems: list[Problem], source: str = "corpus") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s) (pass skip_bad=True / --skip-bad to "
                         f"skip the affected utterances):\n{lines}")


def report_skipped(problems: list[Problem], source: str) -> None:
    """Log, as warnings, every problem whose utterance a loader skips."""
    if problems:
        logger.warning("%s: skipping %d problem(s):\n%s", source, len(problems),
                       "\n".join(f"  {problem}" for problem in problems))


def check_transcript(raw: str, where: str, problems: list[Problem]) -> str | None:
    """Normalise a transcript; return it, or None after appending a problem against ``where`` to ``problems``."""
    bad = unsupported_characters(raw)
    if bad:
        problems.append(Problem(where, "unsupported-characters", describe_characters(bad)))
        return None
    text = normalize_text(raw)
    if not text:
        problems.append(Problem(where, "empty-transcript", f"transcript {raw!r} is empty once normalised"))
        return None
    return text
