"""The n-gram estimator: modified Kneser-Ney against probabilities computed by hand, distributions that sum
to one, and KenLM (flashlight-text) reading the ARPA file back to the same numbers."""

import math
from collections import Counter

import pytest

from streamssl.asr.lm import (
    FALLBACK_DISCOUNTS, arpa_words, discounts_of, estimate, read_sentences, sentences_of, write_arpa)
from streamssl.cli import main

TINY = [["A", "B"], ["A", "C"], ["B"]]
TEXT = ("The cat sat on the mat. The dog sat on the log! A cat and a dog sat on the mat; the cat saw 2 dogs.\n"
        "On the mat the dog sat. Did the cat see the dog? The dog saw the cat on the log.")


def test_discounts_from_count_of_counts():
    # Y = 10 / (10 + 2 * 5) = 0.5; D1 = 1 - 2Y * 5/10, D2 = 2 - 3Y * 3/5, D3+ = 3 - 4Y * 2/3
    assert discounts_of(Counter({1: 10, 2: 5, 3: 3, 4: 2})) == pytest.approx((0.5, 1.1, 3 - 4 / 3))
    assert discounts_of(Counter({1: 4, 2: 2})) == FALLBACK_DISCOUNTS


def test_bigram_probabilities_computed_by_hand():
    model = estimate(TINY, order=2)
    assert model.discounts == [FALLBACK_DISCOUNTS, FALLBACK_DISCOUNTS]
    assert model.vocabulary == ("</s>", "<unk>", "A", "B", "C")
    # Unigrams from continuation counts A 1, B 2, C 1, </s> 2 (sum 6), gamma = (0.5*2 + 1*2)/6 = 0.5, 5 words.
    unigram = {"A": 0.5 / 6 + 0.1, "B": 1 / 6 + 0.1, "C": 0.5 / 6 + 0.1, "</s>": 1 / 6 + 0.1, "<unk>": 0.1}
    for word, p in unigram.items():
        assert 10 ** model.log10_prob(word) == pytest.approx(p)
    # After <s>: raw counts A 2, B 1 (sum 3), gamma = (0.5 + 1)/3 = 0.5.
    assert 10 ** model.log10_prob("A", ("<s>",)) == pytest.approx(1 / 3 + 0.5 * unigram["A"])
    assert 10 ** model.log10_prob("B", ("<s>",)) == pytest.approx(0.5 / 3 + 0.5 * unigram["B"])
    assert 10 ** model.log10_prob("C", ("<s>",)) == pytest.approx(0.5 * unigram["C"])
    assert 10 ** model.log10_prob("B", ("A",)) == pytest.approx(0.5 / 2 + 0.5 * unigram["B"])
    assert 10 ** model.log10_prob("</s>", ("B",)) == pytest.approx(1 / 2 + 0.5 * unigram["</s>"])
    assert 10 ** model.log10_prob("ZEBRA", ("A",)) == pytest.approx(0.5 * unigram["<unk>"])
    assert model.log10_backoffs[0][("A",)] == pytest.approx(math.log10(0.5))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_distribution_sums_to_one(order):
    model = estimate(sentences_of(TEXT), order=order)
    contexts = {gram[:-1] for level in model.log10_probs[1:] for gram in level} | {()}
    for context in contexts:
        total = sum(10 ** model.log10_prob(w, context) for w in model.vocabulary)
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_text_is_normalised_into_sentences(tmp_path):
    assert list(sentences_of("It costs $5. Really?\nНет. Yes: 21st")) == [
        ["IT", "COSTS", "FIVE", "DOLLARS"], ["REALLY"], ["YES"], ["TWENTY", "FIRST"]]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        list(read_sentences([tmp_path / "bad.txt"]))
    with pytest.raises(ValueError, match="no such text file"):
        list(read_sentences([tmp_path / "missing.txt"]))


def test_vocabulary_limits_and_unknown_words():
    model = estimate(sentences_of(TEXT), order=2, max_words=3)
    assert model.vocabulary == ("</s>", "<unk>", "CAT", "DOG", "THE")  # 5, 5 and 13 times
    model = estimate(sentences_of(TEXT), order=2, vocabulary=["cat", "dog"])
    assert set(model.vocabulary) == {"</s>", "<unk>", "CAT", "DOG"}
    with pytest.raises(ValueError, match="order"):
        estimate(TINY, order=0)
    with pytest.raises(ValueError, match="no sentences"):
        estimate([], order=2)


def test_kenlm_reads_the_arpa_file_back(tmp_path):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    model = estimate(sentences_of(TEXT), order=3)
    path = tmp_path / "lm.arpa"
    write_arpa(model, path)
    order, words, log10_probs, unknown = arpa_words(path)
    assert order == 3 and unknown == pytest.approx(model.log10_prob("<unk>"), abs=1e-6)
    assert set(words) == set(model.vocabulary) - {"</s>", "<unk>"}
    assert log10_probs[words.index("THE")] == pytest.approx(model.log10_prob("THE"), abs=1e-6)
    kenlm = KenLM(str(path), Dictionary(list(words)))
    for sentence in (["THE", "CAT", "SAT", "ON", "THE", "LOG"], ["DOG", "THE", "MAT", "SAW"]):
        state, history = kenlm.start(False), ("<s>",)
        for word in sentence:
            state, score = kenlm.score(state, words.index(word))
            assert score == pytest.approx(model.log10_prob(word, history), abs=1e-5), (word, history)
            history = history + (word,)
        assert kenlm.finish(state)[1] == pytest.approx(model.log10_prob("</s>", history), abs=1e-5)


def test_lm_build_command(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "new" / "folder" / "lm.arpa"
    assert main(["lm", "build", "--text", str(text), "--order", "2", "--out", str(out)]) == 0
    assert "order 2" in capsys.readouterr().out
    assert out.read_text().startswith("\n\\data\\\nngram 1=")
    assert main(["lm", "build", "--out", str(out)]) == 2
    assert "--text FILE" in capsys.readouterr().err
    assert main(["lm", "build", "--text", str(text), "--wordfreq", "100", "--out", str(out)]) == 0
    order, words, _, _ = arpa_words(out)
    # the text's 21 words and wordfreq's 100 most frequent (THE, OF, AND... among both)
    assert order == 3 and {"THE", "OF", "MAT", "LOG"} <= set(words) and 100 <= len(words) < 121


def test_a_base_distribution_replaces_the_uniform_one():
    # base weights A 2, B 1, Z 1; C, </s> and <unk> weigh as the lightest (1): the floor sums to 7
    model = estimate(TINY, order=2, base={"A": 2.0, "B": 1.0, "Z": 1.0})
    assert model.vocabulary == ("</s>", "<unk>", "A", "B", "C", "Z")
    # continuation counts as before (sum 6, gamma 0.5), now over the base instead of 1/5
    assert 10 ** model.log10_prob("A") == pytest.approx(0.5 / 6 + 0.5 * 2 / 7)
    assert 10 ** model.log10_prob("Z") == pytest.approx(0.5 * 1 / 7)
    assert 10 ** model.log10_prob("Z", ("A",)) == pytest.approx(0.5 * 0.5 * 1 / 7)
    assert sum(10 ** model.log10_prob(w) for w in model.vocabulary) == pytest.approx(1.0)
