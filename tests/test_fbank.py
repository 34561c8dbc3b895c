"""The log-mel frontend: knf features stream exactly, global statistics, impossible options."""

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_encoder
from streamssl import Encoder, EncoderConfig
from streamssl.frontends.fbank import knf_options
from streamssl.runtime.logmel import PCM_SCALE


def fbank_encoder(**options):
    return make_encoder("llsa", frontend="fbank", frontend_options=options, left_frames=4, right_frames=1)


def speech_like(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(n, generator=g)).float()


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(1, 16000), min_size=1, max_size=10), n=st.integers(400, 20000))
def test_knf_online_extractor_fed_in_chunks_equals_offline_extract_exactly(cuts, n):
    frontend = fbank_encoder().frontend
    wave = speech_like(n, seed=n)
    offline, mel_lengths = frontend.extract(wave[None])
    assert mel_lengths.item() == (n - 400) // 160 + 1
    online = knf.OnlineFbank(knf_options(frontend.options, 16000))
    pcm = wave.numpy() * np.float32(PCM_SCALE)
    pos = 0
    for size in cuts + [n]:
        online.accept_waveform(16000, pcm[pos:pos + size])
        pos += size
    frames = np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])
    assert np.array_equal(frames, offline[0].numpy())
    # The frontend's own streaming extractor (pending samples in a fixed-shape state) agrees bit for bit too.
    pending, waiting = torch.zeros(1, 399), torch.zeros(1, dtype=torch.long)
    pieces, pos = [], 0
    for size in cuts + [n]:
        piece = wave[None, pos:pos + size]
        mel, new, pending, waiting = frontend.log_mel.step(piece, torch.tensor([piece.shape[1]]), pending, waiting)
        assert mel.shape[1] == -(-piece.shape[1] // 160) and int(waiting) < 400
        pieces.append(mel[:, mel.shape[1] - int(new):])
        pos += size
    assert torch.equal(torch.cat(pieces, dim=1), offline)


def test_extract_is_80_bin_log_mel_every_10_ms():
    frontend = fbank_encoder().frontend
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * torch.arange(16000) / 16000)
    mel, lengths = frontend.extract(tone[None])
    assert mel.shape == (1, 98, 80) and lengths.tolist() == [98]
    # 220 Hz is 308 mel; 80 bands from 20 Hz (32 mel) to 8 kHz (2840 mel) are 34.7 mel apart, so the
    # band centred nearest it is band 7 (0-based), in every frame.
    assert set(mel[0].argmax(-1).tolist()) == {7}


def test_fit_normalizer_sets_global_statistics_that_travel_in_the_state_dict():
    encoder = fbank_encoder()
    frontend = encoder.frontend
    assert frontend.needs_statistics()
    waves = torch.stack([speech_like(8000, seed=s) * (s + 1) for s in range(4)])
    lengths = torch.tensor([8000, 6000, 5000, 8000])
    frames = frontend.fit_normalizer([(waves[:2], lengths[:2]), (waves[2:], lengths[2:])])
    mel, mel_lengths = frontend.extract(waves, lengths)
    assert frames == int(mel_lengths.sum()) == 2 * 48 + 36 + 29  # (S - 400) // 160 + 1 each
    assert not frontend.needs_statistics()
    valid = torch.cat([mel[b, :n] for b, n in enumerate(mel_lengths.tolist())])
    normalized = frontend.normalizer(valid.double())
    assert torch.allclose(normalized.mean(0), torch.zeros(80, dtype=torch.float64), atol=1e-4)
    varying = frontend.normalizer.std > 1e-3
    assert torch.allclose(normalized.std(0, unbiased=False)[varying], torch.ones(int(varying.sum()),
                          dtype=torch.float64), atol=1e-3)
    state = encoder.state_dict()
    assert {"frontend.normalizer.mean", "frontend.normalizer.std", "frontend.normalizer.frames"} <= set(state)
    rebuilt = Encoder(encoder.config)
    assert rebuilt.frontend.needs_statistics()
    rebuilt.load_state_dict(state)
    assert not rebuilt.frontend.needs_statistics()
    assert torch.equal(rebuilt.frontend.normalizer.mean, frontend.normalizer.mean.float())


def test_features_are_the_torch_part_applied_to_extracted_log_mel():
    frontend = fbank_encoder().frontend
    wave = speech_like(9000)[None].double()
    feats, lengths = frontend(wave)
    mel, mel_lengths = frontend.extract(wave)
    again, again_lengths = frontend.encode_features(mel, mel_lengths)
    assert torch.equal(feats, again) and lengths.tolist() == again_lengths.tolist() == [(54 // 4)]
    assert feats.shape == (1, 13, frontend.feature_dim)


@pytest.mark.parametrize("options, match", [
    ({"window_ms": 8.0}, r"frontend_options.window_ms \(8.0\) must be at least hop_ms \(10.0\)"),
    ({"subsampling": 3}, r"fbank frontend: EncoderConfig.frontend_options.subsampling must be one of \(2, 4\), got 3"),
    ({"subsampling": 8}, "frontend_options.subsampling"),
    ({"kernel": 1}, "frontend_options.kernel"),
    ({"num_mel_bins": 0}, "frontend_options.num_mel_bins"),
    ({"hop_ms": 0.0}, "frontend_options.hop_ms"),
    ({"high_freq_hz": 10.0}, "frontend_options.high_freq_hz"),
    ({"dither": 1.0}, r"unknown EncoderConfig.frontend_options for 'fbank': \['dither'\]"),
])
def test_impossible_fbank_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig.tiny(frontend="fbank", frontend_options=options)


@pytest.mark.parametrize("rate, options, match", [
    (4000, {}, "EncoderConfig.sample_rate 4000 Hz cannot take the fbank frontend's num_mel_bins=80"),
    (22050, {}, r"EncoderConfig.sample_rate 22050 Hz: the fbank frontend's window_ms \(25.0\) is 551.25 samples"),
    (16000, {"high_freq_hz": 9000.0}, "EncoderConfig.sample_rate 16000 Hz cannot take .*high_freq_hz=9000.0"),
    (0, {}, "EncoderConfig.sample_rate must be a positive integer"),
])
def test_a_sample_rate_fbank_cannot_take_is_refused(rate, options, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig.tiny(frontend="fbank", frontend_options=options, sample_rate=rate)


def test_other_sample_rates_that_fbank_can_take_give_the_same_frame_timing():
    config = EncoderConfig.tiny(frontend="fbank", sample_rate=8000, mixer="llsa")
    geometry = config.frame_geometry()
    assert (geometry.hop, geometry.lookahead, geometry.frame_ms, geometry.lookahead_ms) == (320, 120, 40.0, 15.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from train_corpus import make_corpus

    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=8))


def test_training_estimates_statistics_from_scratch_and_a_finetune_keeps_the_pretrained_ones(corpus, tmp_path):
    from streamssl.streaming import Recognizer
    from streamssl.asr.ctc import greedy_decode
    from streamssl.train.api import build_config, run_training
    from streamssl.train.checkpoint import load_checkpoint

    encoder = [("encoder.frontend", "fbank"), ("encoder.frontend_options", {"channels": 16})]
    pre = build_config("pretrain", "tiny", None, encoder + [("normalizer_utterances", 5)], train_data=corpus, steps=2)
    run_training("pretrain", pre, str(tmp_path / "pt"), progress=False)
    pretrained = load_checkpoint(tmp_path / "pt", kind="pretrain").model.encoder.frontend.normalizer
    assert int(pretrained.frames) > 0 and float(pretrained.std.min()) > 0
    scratch = build_config("finetune", "tiny", None, encoder, train_data=corpus, steps=1)
    run_training("finetune", scratch, str(tmp_path / "scratch"), progress=False)
    fitted = load_checkpoint(tmp_path / "scratch", kind="finetune").model.encoder.frontend.normalizer
    # All 8 utterances (the default takes up to 300) give more frames than the pretraining's 5.
    assert int(fitted.frames) > int(pretrained.frames)
    ft = build_config("finetune", "tiny", None, [("steps", 1)], train_data=corpus, init=str(tmp_path / "pt"))
    run_training("finetune", ft, str(tmp_path / "ft"), progress=False)
    model = load_checkpoint(tmp_path / "ft", kind="finetune").model
    kept = model.encoder.frontend.normalizer
    for name in ("mean", "std", "frames"):
        assert torch.equal(getattr(kept, name), getattr(pretrained, name)), name
    # The recogniser streams an fbank model like any other waveform model.
    wave = speech_like(12000)
    with torch.no_grad():
        offline, lengths = model(wave[None])
    stream = Recognizer(model, chunk_ms=30).stream()
    for start in range(0, 12000, 777):
        stream.accept(wave[start:start + 777])
    transcript = stream.finish()
    assert stream.frames_out == int(lengths) == 18  # (12000 - 400) // 160 + 1 = 73 log-mel frames, 4 each
    assert transcript.text == greedy_decode(offline, lengths, model.vocab)[0]


@pytest.mark.parametrize("frontend, init, setting, frozen", [
    ("fbank", "pretrained", None, False), ("conv", "pretrained", None, True), ("fbank", None, None, False),
    ("conv", None, None, False), ("fbank", "pretrained", True, True), ("conv", "pretrained", False, False)])
def test_fine_tuning_freezes_the_frontend_by_its_own_default(frontend, init, setting, frozen):
    from streamssl.train.checkpoint import build_model
    from streamssl.train.config import FinetuneConfig

    config = FinetuneConfig(init=init, freeze_frontend=setting)
    model = build_model("finetune", config, EncoderConfig.tiny(mixer="llsa", frontend=frontend))
    assert model.freeze_frontend is frozen
    assert all(p.requires_grad is not frozen for p in model.encoder.frontend.parameters())
