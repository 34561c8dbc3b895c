"""CTC model: vocabulary, incremental greedy decoding, streaming == offline, evaluation."""

import random

import pytest
import torch
from train_corpus import make_corpus

from streamssl import EncoderConfig
from streamssl.asr.ctc import CharVocab, CTCModel, GreedyDecoder, greedy_decode
from streamssl.asr.evaluate import evaluate_model, score
from streamssl.mixers import MIXERS

STREAMABLE = [name for name in sorted(MIXERS)
              if CTCModel(EncoderConfig.tiny(mixer=name)).encoder.stack.stream_error() is None]


def test_vocab_round_trip_and_refusal():
    vocab = CharVocab()
    assert len(vocab) == 29 and vocab.symbols[0] == "<blank>"
    assert vocab.decode(vocab.encode("IT'S A DOG")) == "IT'S A DOG"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("it's")


def test_greedy_decoder_merges_repeats_across_chunk_boundaries():
    vocab = CharVocab()
    a, b = vocab.index["A"], vocab.index["B"]
    frames = [a, a, 0, a, b, b, b, 0, 0, b]   # -> "AABB"
    log_probs = torch.full((1, len(frames), len(vocab)), -10.0)
    log_probs[0, torch.arange(len(frames)), frames] = 0.0
    offline = greedy_decode(log_probs, torch.tensor([len(frames)]), vocab)
    assert offline == ["AABB"]
    for cut in range(len(frames) + 1):
        decoder = GreedyDecoder(vocab, 1)
        first = decoder.push(log_probs[:, :cut])
        second = decoder.push(log_probs[:, cut:])
        assert decoder.texts() == offline
        assert len(first[0]) + len(second[0]) == 4


@pytest.mark.parametrize("mixer", STREAMABLE)
@pytest.mark.parametrize("head", ["linear", "lstm"])
def test_streaming_log_probs_equal_offline(mixer, head):
    torch.manual_seed(0)
    model = CTCModel(EncoderConfig.tiny(mixer=mixer), head=head, lstm_hidden=16).double().eval()
    wave = torch.randn(2, 7000, dtype=torch.float64)
    lengths = torch.tensor([7000, 5000])
    with torch.no_grad():
        offline, frame_lengths = model(wave, lengths)
        rng = random.Random(mixer + head)
        for b in range(2):
            state = model.init_state(1)
            pieces, start = [], 0
            while start < int(lengths[b]):
                size = rng.choice([1, 37, 320, 641, 2000])
                out, state = model.step(wave[b:b + 1, start:min(start + size, int(lengths[b]))], state)
                pieces.append(out)
                start += size
            out, state = model.flush(state)
            streamed = torch.cat(pieces + [out], dim=1)[0]
            torch.testing.assert_close(streamed, offline[b, : int(frame_lengths[b])], rtol=1e-9, atol=1e-9)


def test_bidirectional_head_only_on_an_offline_encoder():
    with pytest.raises(ValueError, match="bidirectional"):
        CTCModel(EncoderConfig.tiny(mixer="llsa"), head="lstm", bidirectional=True)
    torch.manual_seed(0)
    model = CTCModel(EncoderConfig.tiny(mixer="full"), head="lstm", lstm_hidden=8, bidirectional=True).eval()
    wave = torch.randn(2, 6000)
    log_probs, lengths = model(wave, torch.tensor([6000, 4000]))
    alone, alone_lengths = model(wave[1:, :4000])
    # packing keeps the backward direction from reading the padding
    torch.testing.assert_close(log_probs[1, : int(lengths[1])], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot stream"):
        model.init_state(1)


def test_offline_and_streaming_evaluation_give_identical_transcripts(tmp_path):
    from streamssl.data import load_utterances

    utterances = load_utterances(make_corpus(tmp_path, n=4))
    torch.manual_seed(3)
    model = CTCModel(EncoderConfig.tiny(mixer="llsa"), head="lstm", lstm_hidden=16).eval()
    offline = evaluate_model(model, utterances)
    streaming = evaluate_model(model, utterances, streaming=True, chunk_ms=30)
    assert [h for _, _, h in offline.hypotheses] == [h for _, _, h in streaming.hypotheses]
    assert all(h for _, _, h in offline.hypotheses)  # an untrained model still emits characters
    assert offline.wer == streaming.wer and offline.cer == streaming.cer
    assert streaming.rtf > 0 and streaming.latency["encoder_lookahead_frames"] == 2


@pytest.mark.parametrize("mixer", ["llsa", "emformer"])
def test_batched_streaming_evaluation_equals_one_stream_at_a_time(tmp_path, mixer):
    """Streams join and leave a running batch (utterances of different lengths, more than the batch),
    yet every transcript is the one decoded alone, and the offline one."""
    from streamssl.data import load_utterances

    utterances = load_utterances(make_corpus(tmp_path, n=7, words=(1, 4)))
    assert len({utt.duration for utt in utterances}) > 3
    torch.manual_seed(3)
    model = CTCModel(EncoderConfig.tiny(mixer=mixer)).double().eval()
    with torch.no_grad():
        model.output.weight *= 10  # a random model that says many, varied characters
    offline = [h for _, _, h in evaluate_model(model, utterances).hypotheses]
    assert sum(len(h) for h in offline) > 80 and len(set("".join(offline))) >= 4
    for batch_size in (1, 3, 16):
        result = evaluate_model(model, utterances, streaming=True, chunk_ms=40, batch_size=batch_size)
        assert [h for _, _, h in result.hypotheses] == offline, batch_size
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate_model(model, utterances, streaming=True, batch_size=0)


def test_score_uses_corpus_level_rates():
    wer, cer = score(["A CAT", "THE DOG"], ["A CAT", "THE DOGS"])
    assert wer == pytest.approx(1 / 4)
    assert cer == pytest.approx(1 / 12)
