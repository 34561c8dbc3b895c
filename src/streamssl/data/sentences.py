"""Coherent English sentences for a test split: the English dialogues that the ``chatterbot-corpus`` package
ships (BSD licence, YAML files, no download).

The synthetic corpus's own text (Faker templates and a bigram chain over web word counts) is locally
plausible but not coherent, so a recogniser with a learned language model of real English (Whisper) gains
little from it; a split of real sentences measures that gain. The package's English files are question and
answer pairs on everyday topics (emotions, food, history, literature, money, science, sports, trivia, ...);
the programming and technical-support files (code, product names, version numbers) and the bot's own
profile are left out, and so are the lines of the Zen of Python that one dialogue quotes (Python's ``this``
module). A sentence is kept when it is written as one (a capital first letter, a closing
``.``, ``!`` or ``?``), eSpeak NG can read it as written (letters, digits, apostrophes and sentence
punctuation only; no all-caps acronyms, which eSpeak spells letter by letter), and its normal form has
``MIN_WORDS`` to ``MAX_WORDS`` words. Install with ``pip install 'streamssl[sentences]'``.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import importlib.util
import io
import re
from pathlib import Path

import yaml

from streamssl.data.text import normalize_text, spell_out

CATEGORIES = ("ai", "computers", "conversations", "emotion", "food", "gossip", "greetings", "health", "history",
              "humor", "literature", "money", "movies", "politics", "psychology", "science", "sports", "trivia")
MIN_WORDS, MAX_WORDS = 5, 25

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_READABLE = re.compile(r"[A-Z][A-Za-z0-9' ,;:\-$%]*[A-Za-z0-9'%][.!?]")
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")


def _corpus_folder() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ValueError("the coherent English sentences come from the 'chatterbot-corpus' package: "
                         "pip install 'streamssl[sentences]' (or pip install chatterbot-corpus)")
    return Path(spec.origin).parent / "data" / "english"


def _lines(value) -> list[str]:
    """Every string in a parsed YAML value (conversations are lists of lists of strings)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [line for item in value for line in _lines(item)]
    return []


def is_usable(sentence: str) -> bool:
    """Whether ``sentence`` is written as a sentence that eSpeak NG reads as written, of ``MIN_WORDS`` to
    ``MAX_WORDS`` words once normalised."""
    if not _READABLE.fullmatch(sentence) or _ACRONYM.search(sentence):
        return False
    return MIN_WORDS <= len(normalize_text(spell_out(sentence)).split()) <= MAX_WORDS


def _zen_of_python() -> list[str]:
    """The Zen's lines in normal form (the dialogue splits and punctuates them its own way)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the Zen
        this = importlib.import_module("this")
    return [normalize_text(line) for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line.strip()]


def english_sentences() -> list[str]:
    """The usable sentences of the chosen categories (see the module docstring), each once, in file and line
    order; the texts as written (numbers and punctuation kept: the synthesiser spells them out and the
    transcript is their normal form).

    Raises:
        ValueError: chatterbot-corpus is not installed, or a category file is missing from it.
    """
    folder = _corpus_folder()
    zen = _zen_of_python()
    seen: set[str] = set()
    sentences: list[str] = []
    for category in CATEGORIES:
        path = folder / f"{category}.yml"
        if not path.is_file():
            raise ValueError(f"chatterbot-corpus has no {path.name} in {folder}; streamssl expects its English "
                             f"categories {', '.join(CATEGORIES)}")
        for line in _lines(yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])):
            for sentence in _SENTENCE_END.split(" ".join(line.split())):
                if sentence in seen or not is_usable(sentence):
                    continue
                seen.add(sentence)
                if not any(normalize_text(sentence) in zen_line for zen_line in zen):
                    sentences.append(sentence)
    return sentences
