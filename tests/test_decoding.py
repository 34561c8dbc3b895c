"""Streaming beam search in the one streaming core: the Recognizer's partials are the best hypothesis with
its stable words marked, stable words are final, streamed equals offline for any chunking, endpoints close
a segment, hotwords per stream."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_recognizer import checkpoint, tiny_model, wave  # noqa: F401 (checkpoint: a fixture)

from streamssl.asr.lexicon import BeamSearchConfig, LexiconDecoder
from streamssl.streaming.engine import decoder_factory
from streamssl.streaming.recognizer import Recognizer

BEAM = BeamSearchConfig(lexicon_words=3000, beam_size=16)


@functools.lru_cache(maxsize=None)
def model():
    return tiny_model("llsa")


@functools.lru_cache(maxsize=None)
def audio(seconds: float = 2.0) -> torch.Tensor:
    return torch.cat([wave(0.6, seed) for seed in range(int(seconds / 0.6) + 1)])


@functools.lru_cache(maxsize=None)
def offline(seconds: float = 2.0, beam: BeamSearchConfig = BEAM):
    """The offline beam search over the whole utterance: its words (with frames) and its text."""
    with torch.no_grad():
        log_probs, lengths = model()(audio(seconds)[None])
    decoder = LexiconDecoder(model().vocab, 1, beam)
    decoder.push(log_probs, lengths)
    decoder.finish()
    return decoder.hypothesis(0)[0], decoder.texts()[0]


def recognizer(chunk_ms=None, clock=None, beam: BeamSearchConfig = BEAM) -> Recognizer:
    kwargs = {} if clock is None else {"clock": clock}
    return Recognizer(model(), chunk_ms=chunk_ms, decoder=decoder_factory(model().vocab, beam), **kwargs)


@pytest.mark.parametrize("margin", [math.inf, 0.0])
@settings(max_examples=8, deadline=None)
@given(pieces=st.lists(st.integers(160, 9000), min_size=1, max_size=5), chunk_ms=st.sampled_from([None, 20.0, 50.0]))
def test_streamed_beam_search_equals_offline_for_any_chunking(margin, pieces, chunk_ms):
    beam = dataclasses.replace(BEAM, stable_margin=margin)
    words, text = offline(beam=beam)
    stream = recognizer(chunk_ms, beam=beam).stream()
    samples, fed, i, stable = audio(), 0, 0, []
    while fed < samples.numel():
        n = pieces[i % len(pieces)]
        update = stream.accept(samples[fed:fed + n])
        fed, i = fed + n, i + 1
        # the stable words only grow, are final, and lead the partial
        assert update.stable.split()[:len(stable)] == stable
        stable = update.stable.split()
        assert update.partial.split()[:len(stable)] == stable
        assert update.stable == stream.stable_text and [w.text for w in stream.words] == stable
    transcript = stream.finish()
    assert transcript.text == text and text
    assert [w.text for w in transcript.words] == [w.text for w in words]
    assert " ".join(stable) == " ".join(text.split()[:len(stable)])


def test_words_carry_times_confidence_and_the_delay_of_becoming_stable():
    now = [0.0]
    rec = recognizer(chunk_ms=40.0, clock=lambda: now[0])
    stream = rec.stream()
    samples = audio()
    updates = []
    for start in range(0, samples.numel(), 640):
        now[0] = start / 16000 + 0.04
        updates.append(stream.accept(samples[start:start + 640]))
    now[0] += 0.5
    transcript = stream.finish()
    words, _ = offline()
    hop = rec.hop_samples / 16000
    for word, decoded in zip(transcript.words, words):
        assert word.start_s == pytest.approx(decoded.first_frame * hop)
        assert word.end_s == pytest.approx(decoded.last_frame * hop + rec.window_samples / 16000)
        assert word.confidence == pytest.approx(decoded.confidence) and 0 < word.confidence <= 1
        assert word.delay_s >= 0
    emitted = [w for u in updates for w in u.words]
    assert emitted == transcript.words[:len(emitted)] and emitted
    # a word's delay runs from the accept call that brought its last frame's window to the one in which
    # it became stable (the clock reads 40 ms after each 640-sample piece's end)
    for i, update in enumerate(updates):
        for word in update.words:
            end = round(word.end_s * 16000)
            arrived = (-(-end // 640) - 1) * 640 / 16000 + 0.04
            assert word.delay_s == pytest.approx((i * 640) / 16000 + 0.04 - arrived)
    assert any(u.unstable for u in updates)


def test_an_endpoint_closes_the_segment_and_restarts_the_search():
    generator = torch.Generator().manual_seed(5)
    first, second = (torch.randn(1, n, len(model().vocab), generator=generator).mul(3).log_softmax(-1)
                     for n in (50, 40))

    def alone(log_probs):
        decoder = LexiconDecoder(model().vocab, 1, BEAM)
        decoder.push(log_probs)
        decoder.finish()
        return decoder.hypothesis(0)[0]

    decoder = LexiconDecoder(model().vocab, 1, BEAM)
    decoder.push(first)
    decoder.end_segment(0)
    words, stable = decoder.hypothesis(0)
    assert words == alone(first) and stable == len(words) and decoder.spelling(0) == ""
    decoder.push(second)
    decoder.finish()
    # the second segment is a sentence of its own, at frames after the first's
    shifted = [type(w)(w.text, w.first_frame + 50, w.last_frame + 50, w.confidence) for w in alone(second)]
    assert decoder.hypothesis(0)[0] == alone(first) + shifted

    stream = recognizer(chunk_ms=40.0).stream()
    stream.accept(audio())
    closed = stream.end_segment()
    assert stream.words[len(stream.words) - len(closed):] == closed and stream.words
    assert stream.unstable_text == "" and stream.stable_text == stream.text


def test_greedy_refuses_hotwords_and_the_beam_takes_them():
    greedy = Recognizer(model(), chunk_ms=40.0)
    assert greedy.stream().end_segment() == []
    with pytest.raises(ValueError, match="hotwords need the lexicon decoder"):
        greedy.stream(hotwords=[("ZORBLAX",)])
    stream = recognizer(40.0).stream(hotwords=[("ZORBLAX",)])
    assert "ZORBLAX" in stream.decoder._decoder.words


def test_decoder_flags_default_to_the_beam_search_config():
    import argparse

    from streamssl.commands.common import add_decoder_arguments, beam_config

    parser = argparse.ArgumentParser()
    add_decoder_arguments(parser, default="lexicon")
    assert beam_config(parser.parse_args([])) == BeamSearchConfig()
    assert beam_config(parser.parse_args(["--decoder", "greedy"])) is None
    with pytest.raises(ValueError, match="--lm needs --decoder lexicon"):
        beam_config(parser.parse_args(["--decoder", "greedy", "--lm", "x.arpa"]))


def test_stream_command_with_the_lm_and_hotwords(checkpoint, tmp_path, capsys):
    import json

    import soundfile

    from streamssl.asr.lm import estimate, sentences_of, write_arpa
    from streamssl.cli import main

    wav = tmp_path / "a.wav"
    soundfile.write(wav, audio().numpy().clip(-1, 1), 16000)
    lm = tmp_path / "lm.arpa"
    write_arpa(estimate(sentences_of("SEE THE TEA. THE SEA. A TEE SET."), order=2), lm)
    hotwords = tmp_path / "hot.txt"
    hotwords.write_text("# names\nZorblax\n")
    args = ["stream", "--checkpoint", str(checkpoint), str(wav), "--json", "--quiet", "--decoder", "lexicon",
            "--lm", str(lm)]
    assert main(args + ["--hotwords", str(hotwords)]) == 0
    result = json.loads(capsys.readouterr().out)["files"][0]
    assert set(result["transcript"].split()) <= {"SEE", "THE", "TEA", "SEA", "A", "TEE", "SET", "ZORBLAX"}
    assert [w["text"] for w in result["words"]] == result["transcript"].split()
    assert all(0 < w["confidence"] <= 1 for w in result["words"])
    assert main(args[:-4] + ["--hotwords", str(hotwords)]) == 2
    assert "--hotwords needs --decoder lexicon" in capsys.readouterr().err
    assert main(args + ["--hotwords", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
