"""Lexicon beam search: writes only lexicon words, corrects a misspelling greedy CTC keeps, streams exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_corpus import make_corpus

from streamssl import EncoderConfig
from streamssl.asr.ctc import CharVocab, CTCModel, greedy_decode
from streamssl.asr.evaluate import evaluate_model
from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder

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


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 60), max_size=8), seed=st.integers(0, 3))
def test_chunked_decoding_equals_whole(cuts, seed):
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(2, 60, len(VOCAB), generator=generator).mul(3).log_softmax(-1)
    lengths = torch.tensor([60, 41])
    whole = LexiconDecoder(VOCAB, 2)
    whole.push(log_probs, lengths)
    whole.finish()
    chunked = LexiconDecoder(VOCAB, 2)
    bounds = [0, *sorted(cuts), 60]
    for start, end in zip(bounds, bounds[1:]):
        chunked.push(log_probs[:, start:end], (lengths - start).clamp(0, end - start))
    chunked.finish()
    assert chunked.texts() == whole.texts() and all(whole.texts())
    assert chunked.frames == [60, 41]


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
