"""Coherent English sentences (chatterbot-corpus) and the synthesiser's test-split-only run that speaks them."""

import pytest

from streamssl.cli import main
from streamssl.data import read_manifest, synthesize_corpus
from streamssl.data.sentences import MAX_WORDS, MIN_WORDS, english_sentences, is_usable
from streamssl.data.synth import deal_sentences, plan_corpus
from streamssl.data.text import normalize_text, spell_out

pytest.importorskip("chatterbot_corpus", reason="the sentences extra (chatterbot-corpus) is not installed")


@pytest.fixture(scope="module")
def sentences():
    return english_sentences()


def test_sentences_are_distinct_usable_and_from_the_chosen_categories(sentences):
    assert len(sentences) >= 500
    assert len(set(sentences)) == len(sentences)
    assert all(is_usable(s) for s in sentences)
    assert "What is the name of the nearest major galaxy to the Milky Way?" in sentences  # trivia.yml
    # botprofile.yml (the bot's persona) is left out, and so is the Zen of Python quoted in conversations.yml.
    assert "My favorite subjects include robotics, computer science, and natural language processing." \
        not in sentences
    zen = [s for s in sentences if normalize_text(s) in ("NAMESPACES ARE ONE HONKING GREAT IDEA",
                                                         "IF THE IMPLEMENTATION IS EASY TO EXPLAIN IT MAY BE A GOOD IDEA")]
    assert zen == []
    lengths = [len(normalize_text(spell_out(s)).split()) for s in sentences]
    assert MIN_WORDS <= min(lengths) and max(lengths) <= MAX_WORDS


def test_is_usable_wants_a_written_readable_sentence_of_five_to_twenty_five_words():
    assert is_usable("Tanks were used in battle for the first time in which conflict?")
    assert is_usable("The Hubble Space Telescope was launched in 1990.")
    assert not is_usable("what is the illuminati")  # not written as a sentence
    assert not is_usable("Who was the first NASA administrator?")  # eSpeak would spell the acronym out
    assert not is_usable("Use print(x) to see it.")  # brackets are not read as written
    assert not is_usable("I agree.")  # too short
    assert not is_usable(("It is " + "very " * 24 + "good.").capitalize())  # 27 words


def test_deal_gives_disjoint_shares_of_every_sentence():
    pool = [f"Sentence number {i} is here." for i in range(10)]
    shares = deal_sentences(pool, 3, seed=0)
    assert [len(s) for s in shares] == [4, 3, 3]
    assert sorted(s for share in shares for s in share) == sorted(pool)
    assert shares == deal_sentences(pool, 3, seed=0) != deal_sentences(pool, 3, seed=1)
    few = deal_sentences(pool[:2], 3, seed=0)
    assert [len(s) for s in few] == [1, 1, 1] and set(s for share in few for s in share) == set(pool[:2])
    with pytest.raises(ValueError, match="cannot deal 0 sentence"):
        deal_sentences([], 3, seed=0)


def test_synth_speaks_sentences_in_the_test_split_alone(sentences, tmp_path):
    hours, seed = 0.02, 7
    summary = synthesize_corpus(tmp_path / "c", hours, seed=seed, sentences=True, splits=("test",), workers=1,
                                progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["LibriSpeech", "SPEAKERS.txt", "test.jsonl"]
    assert list(summary["utterances"]) == ["test"]
    test_speakers = [speaker for speaker, _ in plan_corpus(hours, seed) if speaker.split == "test"]
    lines = (tmp_path / "c" / "SPEAKERS.txt").read_text().splitlines()[1:]
    assert [line.split(" | ")[3] for line in lines] == [speaker.voice for speaker in test_speakers]
    utterances = read_manifest(tmp_path / "c" / "test.jsonl")
    texts = [utt.text for utt in utterances]
    assert len(texts) == summary["utterances"]["test"] >= 2
    assert len(set(texts)) == len(texts)
    assert set(texts) <= {normalize_text(spell_out(s)) for s in sentences}
    assert {utt.speaker for utt in utterances} == {speaker.id for speaker in test_speakers}


def test_synth_sentence_options_are_checked(tmp_path, capsys):
    text = tmp_path / "lines.txt"
    text.write_text("A line of text.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not both"):
        synthesize_corpus(tmp_path / "a", 0.01, seed=1, text_file=text, sentences=True)
    with pytest.raises(ValueError, match=r"splits must be some of train, dev, test, got \['eval'\]"):
        synthesize_corpus(tmp_path / "b", 0.01, seed=1, splits=("eval",))
    assert main(["corpus", "synth", "--out", str(tmp_path / "c"), "--hours", "0.01", "--seed", "1",
                 "--text", str(text), "--sentences"]) == 2
    assert "not allowed with argument --text" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
