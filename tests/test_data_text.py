"""Transcript normalisation to the LibriSpeech convention."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamssl.data import normalize_text, spell_out
from streamssl.data.text import unsupported_characters


@pytest.mark.parametrize("raw, expected", [
    ("Hello, world!", "HELLO WORLD"),
    ("It's  the   boys'   turn -- isn't it?", "IT'S THE BOYS TURN ISN'T IT"),
    ("'Quoted' words", "QUOTED WORDS"),
    ("Twenty-one", "TWENTY ONE"),
    ("I have 3 cats and 21 dogs.", "I HAVE THREE CATS AND TWENTY ONE DOGS"),
    ("1,234", "ONE THOUSAND TWO HUNDRED AND THIRTY FOUR"),
    ("It costs $3.50.", "IT COSTS THREE DOLLARS AND FIFTY CENTS"),
    ("£1", "ONE POUND"),
    ("She came 2nd and he came 23rd.", "SHE CAME SECOND AND HE CAME TWENTY THIRD"),
    ("About 12% of them", "ABOUT TWELVE PERCENT OF THEM"),
    ("pi is 3.14", "PI IS THREE POINT ONE FOUR"),
    ("Box 0466", "BOX ZERO FOUR SIX SIX"),
    ("Tom & Jerry @ home", "TOM AND JERRY AT HOME"),
    ("2 + 2 = 4", "TWO PLUS TWO EQUALS FOUR"),
    ("Café naïve Æsir straße", "CAFE NAIVE AESIR STRASSE"),
    ("It\u2019s \u201cfine\u201d", "IT'S FINE"),
    ("", ""),
])
def test_normalize_examples(raw, expected):
    assert normalize_text(raw) == expected


def test_spell_out_keeps_punctuation_and_case():
    assert spell_out("Buy 2 apples, Tom.") == "Buy two apples, Tom."


@pytest.mark.parametrize("raw, bad", [("ЖУК", "Ж"), ("smile 😀", "😀"), ("tab\x07bell", "\x07"), ("中文", "中")])
def test_unsupported_characters_raise_and_are_named(raw, bad):
    assert bad in unsupported_characters(raw)
    with pytest.raises(ValueError, match=f"U\\+{ord(bad):04X}"):
        normalize_text(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x24FF, exclude_categories=("Cs",))))
def test_normal_form_alphabet_and_idempotence(raw):
    if unsupported_characters(raw):
        with pytest.raises(ValueError, match="unsupported characters"):
            normalize_text(raw)
        return
    text = normalize_text(raw)
    assert re.fullmatch(r"([A-Z']+( [A-Z']+)*)?", text)
    assert normalize_text(text) == text
