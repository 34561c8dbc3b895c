"""Transcript text: spelling out numbers and symbols, and the LibriSpeech normal form.

The LibriSpeech convention is upper-case letters A-Z, the apostrophe inside words, and single spaces.
:func:`spell_out` turns digits and symbols into words but keeps punctuation (it is what the synthesiser
reads, and punctuation shapes its prosody); :func:`normalize_text` then reduces that to the normal form.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

from num2words import num2words

ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")

# Letters that Unicode decomposition does not reduce to A-Z plus a combining mark.
_LETTER_FOLDS = {"æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ß": "ss", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L",
                 "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i"}
_QUOTE_FOLDS = {"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u2032": "'", "`": "'", "\u00b4": "'",
                "\u201c": '"', "\u201d": '"', "\u2013": " - ", "\u2014": " - "}
_SYMBOL_WORDS = {"&": "and", "@": "at", "+": "plus", "=": "equals", "#": "number", "%": "percent",
                 "°": "degrees", "<": "less than", ">": "greater than", "×": "times", "\u2044": "over",
                 "$": "dollars", "£": "pounds", "€": "euros"}
# Replaced before Unicode compatibility normalisation, which would turn them into digits and a fraction slash.
_FRACTIONS = {"½": " one half ", "¼": " one quarter ", "¾": " three quarters "}
_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "£": ("pound", "pounds", "penny", "pence"),
               "€": ("euro", "euros", "cent", "cents")}

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_CURRENCY_RE = re.compile(r"([$£€])\s?(" + _NUMBER + r")")
_PERCENT_RE = re.compile(r"(" + _NUMBER + r")\s?%")
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_NUMBER_RE = re.compile(_NUMBER)
# Digit strings read digit by digit: leading zeros (codes, zip codes) and very long numbers (phone numbers).
_DIGITWISE_MIN_LENGTH = 10


def _number_words(token: str) -> str:
    plain = token.replace(",", "")
    if "." not in plain and (len(plain) >= _DIGITWISE_MIN_LENGTH or (plain.startswith("0") and len(plain) > 1)):
        return " ".join(num2words(int(digit)) for digit in plain)
    return num2words(Decimal(plain))


def _currency_words(symbol: str, amount: str) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[symbol]
    whole, _, fraction = amount.replace(",", "").partition(".")
    words = f"{num2words(int(whole))} {one if int(whole) == 1 else many}"
    if fraction and int(fraction):
        if len(fraction) != 2:
            return f"{num2words(Decimal(amount.replace(',', '')))} {many}"
        sub = int(fraction)
        words += f" and {num2words(sub)} {sub_one if sub == 1 else sub_many}"
    return words


def spell_out(text: str) -> str:
    """Write numbers, currency amounts, percentages, ordinals and common symbols as English words.

    Punctuation and letter case are kept, so the result still reads naturally (it is what the eSpeak NG
    corpus synthesiser speaks). Examples: ``"$3.50"`` -> ``"three dollars and fifty cents"``, ``"21st"`` ->
    ``"twenty-first"``, ``"12%"`` -> ``"twelve percent"``, ``"0466"`` -> ``"zero four six six"``.
    """
    text = unicodedata.normalize("NFKC", "".join(_FRACTIONS.get(char, char) for char in text))
    # Invisible format characters (soft hyphen, zero-width space, byte-order mark) are dropped, not word breaks.
    text = "".join(_QUOTE_FOLDS.get(char, char) for char in text if unicodedata.category(char) != "Cf")
    text = _CURRENCY_RE.sub(lambda m: f" {_currency_words(m.group(1), m.group(2))} ", text)
    text = _PERCENT_RE.sub(lambda m: f" {_number_words(m.group(1))} percent ", text)
    text = _ORDINAL_RE.sub(lambda m: f" {num2words(int(m.group(1)), to='ordinal')} ", text)
    text = _NUMBER_RE.sub(lambda m: f" {_number_words(m.group(0))} ", text)
    text = "".join(f" {_SYMBOL_WORDS[char]} " if char in _SYMBOL_WORDS else char for char in text)
    return re.sub(r"\s+", " ", text).strip()


def unsupported_characters(text: str) -> list[str]:
    """The characters of ``text`` that :func:`normalize_text` cannot write in the LibriSpeech alphabet.

    Punctuation and whitespace are fine (they become spaces), as are invisible format characters (dropped),
    accented Latin letters (accents are dropped), digits and the symbols that :func:`spell_out` knows. Other scripts, emoji and control characters
    are not. Returns each offending character once, in order of appearance.
    """
    found: list[str] = []
    for char in unicodedata.normalize("NFKC", text):
        if char in found or char.isspace() or char.isdigit() or char in _SYMBOL_WORDS:
            continue
        if char in _QUOTE_FOLDS or char in _LETTER_FOLDS:
            continue
        category = unicodedata.category(char)
        if category.startswith("P") or category == "Cf":
            continue
        if category.startswith("L"):
            base = unicodedata.normalize("NFKD", char)[0]
            if base.isascii() and base.isalpha():
                continue
        found.append(char)
    return found


def describe_characters(chars: list[str]) -> str:
    """``"'Ж' (U+0416), '😀' (U+1F600)"`` for use in error messages."""
    return ", ".join(f"{char!r} (U+{ord(char):04X})" for char in chars)


def normalize_text(text: str) -> str:
    """Normalise a transcript to the LibriSpeech convention.

    Numbers and symbols are spelled out, accents dropped, letters upper-cased, punctuation (hyphens included)
    turned into word breaks, apostrophes kept only between letters, and runs of spaces collapsed. The result
    uses only ``A-Z``, ``'`` and single spaces; normalising it again returns it unchanged.

    Raises:
        ValueError: the text holds characters that have no spelling in that alphabet (another script, emoji,
            control characters); the message lists them with their code points.
    """
    bad = unsupported_characters(text)
    if bad:
        raise ValueError(f"unsupported characters {describe_characters(bad)}")
    text = spell_out(text)
    text = "".join(_LETTER_FOLDS.get(char, char) for char in text)
    text = "".join(char for char in unicodedata.normalize("NFKD", text) if not unicodedata.combining(char))
    text = text.upper()
    text = re.sub(r"(?<![A-Z])'|'(?![A-Z])", " ", text)
    text = re.sub(r"[^A-Z']+", " ", text)
    return text.strip()
