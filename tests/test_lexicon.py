"""Lexicon beam search: writes only lexicon words, corrects a misspelling greedy CTC keeps, streams exactly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_corpus import make_corpus

from streamssl import EncoderConfig
from streamssl.asr.ctc import CharVocab, CTCModel, greedy_decode
from streamssl.asr.evaluate import evaluate_model
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder, parse_hotwords

VOCAB = CharVocab()


def spelt(text: str, confusions: dict[int, dict[str, float]] | None = None) -> torch.Tensor:
    """Log-probabilities ``(1, T, V)`` of two frames per character (the character, then a blank); at the
    character positions in ``confusions`` the probability is split between the given characters."""
    frames = []
    for position, char in enumerate(text):
        probs = torch.full((len(VOCAB),), 0.02)
        for c, p in (confusions or {}).get(position, {char: 0.8}).items():
            probs[VOCAB.index[c]] = p
        frames.append(probs)
        blank = torch.full((len(VOCAB),), 0.02)
        blank[VOCAB.blank] = 0.8
        frames.append(blank)
    return (torch.stack(frames) / torch.stack(frames).sum(-1, keepdim=True)).log()[None]


def decode(log_probs: torch.Tensor, config: BeamSearchConfig | None = None) -> str:
    decoder = LexiconDecoder(VOCAB, 1, config)
    decoder.push(log_probs)
    decoder.finish()
    return decoder.texts()[0]


def test_lexicon_corrects_a_spelling_that_greedy_keeps():
    # the last letter sounds more like T than D: greedy writes WORLT, which is no English word
    log_probs = spelt("HELLO WORLT", {10: {"T": 0.5, "D": 0.3}})
    assert greedy_decode(log_probs, torch.tensor([log_probs.shape[1]]), VOCAB) == ["HELLO WORLT"]
    assert decode(log_probs) == "HELLO WORLD"


def test_lexicon_writes_only_its_words_and_its_size_is_the_option():
    torch.manual_seed(0)
    log_probs = torch.randn(1, 120, len(VOCAB)).mul(3).log_softmax(-1)
    small = BeamSearchConfig(lexicon_words=2000)
    decoder = LexiconDecoder(VOCAB, 1, small)
    assert len(decoder.words) == 2000 and decoder.words[:3] == ("THE", "TO", "AND")
    text = decode(log_probs, small)
    assert text and set(text.split()) <= set(decoder.words)


@pytest.mark.parametrize("margin", [math.inf, 0.0, 2.0])
@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=8), seed=st.integers(0, 3))
def test_chunked_decoding_equals_whole(margin, cuts, seed):
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(2, 60, len(VOCAB), generator=generator).mul(3).log_softmax(-1)
    lengths = torch.tensor([60, 41])
    config = BeamSearchConfig(stable_margin=margin)
    whole = LexiconDecoder(VOCAB, 2, config)
    whole.push(log_probs, lengths)
    whole.finish()
    chunked = LexiconDecoder(VOCAB, 2, config)
    bounds = [0, *sorted(cuts), 60]
    stable_seen = [[], []]
    for start, end in zip(bounds, bounds[1:]):
        chunked.push(log_probs[:, start:end], (lengths - start).clamp(0, end - start))
        for b in range(2):
            words, stable = chunked.hypothesis(b)
            assert stable >= len(stable_seen[b]) and words[:len(stable_seen[b])] == stable_seen[b]
            stable_seen[b] = words[:stable]
    chunked.finish()
    assert chunked.texts() == whole.texts() and all(whole.texts())
    assert chunked.frames == [60, 41]
    for b in range(2):
        words, stable = whole.hypothesis(b)
        # the same words at the same frames with the same confidences; every stable prefix was final
        assert chunked.hypothesis(b) == (words, stable) and stable == len(words)
        assert words[:len(stable_seen[b])] == stable_seen[b]
        assert all(0 <= w.first_frame <= w.last_frame < lengths[b] and 0 < w.confidence <= 1 for w in words)


@pytest.mark.parametrize("margin", [math.inf, 0.0])
def test_a_confident_model_that_ends_words_one_frame_before_a_push_ends(margin):
    # Every other token 27 nats below the spelt one: each alternative leaves the beam (threshold 20) at
    # once, so all hypotheses agree on a word one frame after its space; the history is prunable there,
    # with no frame after the prune point, which once left the beam unreadable (an IndexError).
    frames = torch.full((24, len(VOCAB)), 1e-12 / (len(VOCAB) - 1))
    for position, char in enumerate("HELLO WORLD "):
        frames[2 * position, VOCAB.index[char]] = 1 - 1e-12
        frames[2 * position + 1, VOCAB.blank] = 1 - 1e-12
    log_probs = frames.log()[None]
    config = BeamSearchConfig(stable_margin=margin)
    whole = LexiconDecoder(VOCAB, 1, config)
    whole.push(log_probs)
    assert [w.text for w in whole.hypothesis(0)[0]] == ["HELLO", "WORLD"]
    whole.finish()
    per_frame = LexiconDecoder(VOCAB, 1, config)
    for t in range(log_probs.shape[1]):
        per_frame.push(log_probs[:, t:t + 1])
        if t == 11:  # the frame after HELLO's space: the word is final
            words, stable = per_frame.hypothesis(0)
            assert [w.text for w in words] == ["HELLO"] and stable == 1
    per_frame.finish()
    assert per_frame.texts() == whole.texts() == ["HELLO WORLD"] and per_frame.fallbacks == 0
    assert per_frame.hypothesis(0) == whole.hypothesis(0)


def test_a_margin_makes_words_stable_sooner_and_keeps_them(tmp_path):
    from streamssl.asr.lm import estimate, sentences_of, write_arpa

    # MAT sounds likelier than MAP, but "MAP IS OLD" is what the LM knows: the beam changes its mind at OLD
    write_arpa(estimate(sentences_of("THE MAT IS RED. THE MAP IS OLD. " * 3), order=3), tmp_path / "lm.arpa")
    log_probs = spelt("THE MAT IS OLD", {6: {"T": 0.45, "P": 0.35}})

    def stable_after_each_frame(margin):
        decoder = LexiconDecoder(VOCAB, 1, BeamSearchConfig(lm=str(tmp_path / "lm.arpa"), lm_weight=1.0, word_score=0.0,
                                                            stable_margin=margin))
        stable = []
        for t in range(log_probs.shape[1]):
            decoder.push(log_probs[:, t:t + 1])
            words, count = decoder.hypothesis(0)
            stable.append(" ".join(w.text for w in words[:count]))
        decoder.finish()
        return stable, decoder.texts()[0]

    every, every_text = stable_after_each_frame(math.inf)
    best, best_text = stable_after_each_frame(0.0)
    # every hypothesis agrees on THE only after IS (frame 22); MAT is stable once the best closes it (14) ...
    assert every.index("THE") == 22 and every_text == "THE MAP IS OLD"
    assert best.index("THE") == 6 and best.index("THE MAT") == 14 and best.index("THE MAT IS") == 20
    # ... and the search is kept to it: MAP, which the LM prefers later, is never written
    assert best_text == "THE MAT IS OLD"


def test_word_frames_and_confidence():
    log_probs = spelt("HELLO WORLT", {10: {"T": 0.5, "D": 0.3}})
    decoder = LexiconDecoder(VOCAB, 1)
    decoder.push(log_probs)
    decoder.finish()
    hello, world = decoder.hypothesis(0)[0]
    # two frames per character: H at frame 0, O at 8; W at 12, the corrected D at 20
    assert (hello.text, hello.first_frame, hello.last_frame) == ("HELLO", 0, 8)
    assert (world.text, world.first_frame, world.last_frame) == ("WORLD", 12, 20)
    # the lowest letter probability: 0.8 / (0.8 + 28 * 0.02) for HELLO, 0.3 / (0.8 + 27 * 0.02) for the D
    assert hello.confidence == pytest.approx(0.8 / 1.36, rel=1e-5)
    assert world.confidence == pytest.approx(0.3 / 1.34, rel=1e-5)


def test_ngram_lm_puts_words_in_order(tmp_path):
    from streamssl.asr.lm import estimate, sentences_of, write_arpa

    text = "The cat sat on the mat. I read the map. The dog sat on the mat. We read the map today."
    write_arpa(estimate(sentences_of(text * 3), order=3), tmp_path / "lm.arpa")
    config = BeamSearchConfig(lm=str(tmp_path / "lm.arpa"), lm_weight=1.0, word_score=0.0)
    # the last letter sounds more like P than T
    ambiguous = {10: {"P": 0.45, "T": 0.35}}
    assert greedy_decode(spelt("ON THE MAP", ambiguous), torch.tensor([20]), VOCAB) == ["ON THE MAP"]
    assert decode(spelt("ON THE MAT", ambiguous), config) == "ON THE MAT"
    assert decode(spelt("READ THE MAT", ambiguous), config) == "READ THE MAP"
    decoder = LexiconDecoder(VOCAB, 1, config)
    assert set(decoder.words) == {"THE", "CAT", "SAT", "ON", "MAT", "I", "READ", "MAP", "DOG", "WE", "TODAY"}


def test_hotwords_bring_a_rare_word_and_a_name_and_change_nothing_else():
    # a rare lexicon word the acoustics nearly say (ZEAL, heard as SEAL) and a name outside the lexicon
    rare = spelt("ZEAL", {0: {"S": 0.45, "Z": 0.35}})
    name = spelt("ZORBLAX")
    others = [spelt("HELLO WORLT", {10: {"T": 0.5, "D": 0.3}}), spelt("THE CAT SAT"),
              spelt("MY DOG", {3: {"D": 0.4, "B": 0.4}}), spelt("SEE THE SEA")]
    hotwords = parse_hotwords(["zeal", "# a comment", "", "Zorblax"])
    assert hotwords == (("ZEAL",), ("ZORBLAX",))
    assert "ZEAL" in LexiconDecoder(VOCAB, 1).words and "ZORBLAX" not in LexiconDecoder(VOCAB, 1).words

    def run(log_probs, phrases=()):
        decoder = LexiconDecoder(VOCAB, 1, hotwords=phrases)
        decoder.push(log_probs)
        decoder.finish()
        return decoder.texts()[0]

    assert run(rare) == "SEA" and run(rare, hotwords) == "ZEAL"
    assert run(name) != "ZORBLAX" and run(name, hotwords) == "ZORBLAX"
    # margin: no other transcript changes at all
    assert [run(x, hotwords) for x in others] == [run(x) for x in others]


def test_hotword_phrases_gain_only_when_whole():
    from streamssl.asr.lexicon import _Phrases

    phrases = _Phrases([(1, 2, 3), (1,)])
    assert phrases.step((), 1) == (1, (1,))          # starts a phrase (and completes the one-word phrase)
    assert phrases.step((1,), 2) == (1, (1, 2))
    assert phrases.step((1, 2), 3) == (1, ())        # complete: the boosts are kept
    assert phrases.step((1, 2), 9) == (-1, ())       # broken after "1 2": the boost of 2 is given back
    assert phrases.step((1, 2), 1) == (0, (1,))      # broken, and a new phrase starts
    assert phrases.unfinished((1, 2)) == 1
    with pytest.raises(ValueError, match="hotword line 2"):
        parse_hotwords(["ok", "Жук"])


def test_offline_and_streaming_evaluation_agree_with_the_lexicon(tmp_path):
    from streamssl.data import load_utterances

    utterances = load_utterances(make_corpus(tmp_path, n=3))
    torch.manual_seed(3)
    model = CTCModel(EncoderConfig.tiny(mixer="llsa")).eval()
    beam = BeamSearchConfig(lexicon_words=5000, beam_size=16)
    offline = evaluate_model(model, utterances, beam=beam)
    streaming = evaluate_model(model, utterances, streaming=True, chunk_ms=30, beam=beam)
    assert [h for _, _, h in offline.hypotheses] == [h for _, _, h in streaming.hypotheses]
    assert any(h for _, _, h in offline.hypotheses)  # an untrained model's noise still becomes words
    assert offline.decoder == "lexicon" and offline.beam["lexicon_words"] == 5000
    assert evaluate_model(model, utterances).decoder == "greedy"


@pytest.mark.parametrize("options, name", [
    (dict(lexicon_words=0), "lexicon_words"), (dict(beam_size=2.5), "beam_size"),
    (dict(lm_weight=float("nan")), "lm_weight"), (dict(lm_weight=-1.0), "lm_weight"),
    (dict(beam_threshold=0.0), "beam_threshold"), (dict(word_score=float("inf")), "word_score"),
    (dict(hotword_boost=-1.0), "hotword_boost"), (dict(hotword_lookahead=1.5), "hotword_lookahead"),
    (dict(stable_margin=-1.0), "stable_margin"), (dict(stable_margin=float("nan")), "stable_margin"),
    (dict(stable_margin=1.0, lm_weight=0.0), "lm_weight > 0"),
])
def test_bad_options_are_named(options, name):
    with pytest.raises(ValueError, match=name):
        BeamSearchConfig(**options)


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="space symbol"):
        LexiconDecoder(CharVocab(["<blank>", "A", "B"]), 1)
    decoder = LexiconDecoder(VOCAB, 1)
    with pytest.raises(ValueError, match="do not fit 1 streams"):
        decoder.push(torch.zeros(2, 3, len(VOCAB)))
    decoder.push(spelt("CAT"))
    decoder.finish()
    assert decoder.texts() == ["CAT"]
    with pytest.raises(ValueError, match="stream 0 was finished"):
        decoder.push(spelt("DOG"))
