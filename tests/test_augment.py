"""Augmentation from the run configuration: validated, deterministic per seed, on only while training."""

import numpy as np
import pytest
import torch
from train_corpus import make_corpus

from streamssl.data import load_utterances
from streamssl.train.api import build_config
from streamssl.train.augment import AugmentOptions, SpecAugment


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    return load_utterances(str(make_corpus(tmp_path_factory.mktemp("corpus"), n=6)))


def test_waveform_augmentation_is_seeded_by_run_seed_epoch_and_utterance(utterances):
    options = AugmentOptions(speed_factors=(0.9, 1.1), noise_snr_db=(10.0, 10.0))
    a = options.dataset(utterances, 16000, seed=3)
    b = options.dataset(utterances, 16000, seed=3)
    plain = AugmentOptions().dataset(utterances, 16000, seed=3)
    clean = plain[0]["audio"]
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert torch.equal(a[0]["audio"], b[0]["audio"])
    lengths = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        audio = a[0]["audio"]
        lengths.add(audio.shape[0])
    # Speed 0.9 lengthens by 1/0.9, 1.1 shortens by 1/1.1 (soxr may round by a sample).
    expected = {round(clean.shape[0] / 0.9), round(clean.shape[0] / 1.1)}
    assert all(min(abs(n - e) for e in expected) <= 1 for n in lengths) and len(lengths) == 2


def test_noise_is_mixed_at_the_drawn_snr(utterances):
    options = AugmentOptions(noise_snr_db=(12.0, 12.0))
    clean = AugmentOptions().dataset(utterances, 16000, seed=0)[1]["audio"].double()
    noisy = options.dataset(utterances, 16000, seed=0)[1]["audio"].double()
    snr_db = 10 * torch.log10(clean.pow(2).mean() / (noisy - clean).pow(2).mean())
    assert float(snr_db) == pytest.approx(12.0, abs=0.01)


def test_spec_augment_masks_bins_and_frames_within_the_utterance_deterministically():
    spec = SpecAugment(AugmentOptions(spec_freq_masks=2, spec_freq_width=10, spec_time_masks=3,
                                      spec_time_width=20, spec_time_ratio=0.2))
    feats = torch.ones(2, 300, 80)
    lengths = torch.tensor([300, 100])
    out = spec.for_batch([11, 12])(feats, lengths)
    assert torch.equal(out, spec.for_batch([11, 12])(feats, lengths))
    assert not torch.equal(out, spec.for_batch([11, 13])(feats, lengths))
    for b, length in enumerate(lengths.tolist()):
        time, freq = spec.masks(300, 80, length, [11, 12][b])
        masked = out[b] == 0
        assert torch.equal(masked, time[:, None] | freq[None, :])
        assert not time[length:].any()
        assert 0 < int(freq.sum()) <= 20 and int(time.sum()) <= 3 * min(20, int(0.2 * length))


def test_spec_augment_reaches_the_log_mel_bins_of_an_fbank_model_through_the_training_loss(utterances):
    from streamssl.train.tasks import FinetuneTask
    from streamssl.train.dist import World
    from streamssl.data import collate

    config = build_config("finetune", "tiny", None, [
        ("encoder.frontend", "fbank"), ("encoder.frontend_options", {"channels": 16}),
        ("augment", {"spec_freq_masks": 2, "spec_time_masks": 2}), ("mask_prob", 0.0)], train_data="unused")
    torch.manual_seed(0)
    task = FinetuneTask(config, log=lambda *a: None)
    seen = []
    augment = task.spec_augment.for_batch([1, 2])
    task.spec_augment.for_batch = lambda seeds: lambda f, n: seen.append(f.shape) or augment(f, n)
    dataset = AugmentOptions().dataset(utterances[:2], 16000, 0)
    batch = collate([dataset[0], dataset[1]])
    with torch.no_grad():
        augmented = task.loss(task.model, batch, 0, World())["loss"]
    assert seen and seen[0][2] == 80  # mel bins
    task.spec_augment = None
    with torch.no_grad():
        plain = task.loss(task.model, batch, 0, World())["loss"]
    assert augmented.item() != plain.item()


@pytest.mark.parametrize("kind, augment, match", [
    ("finetune", {"speed_factors": [0.9, 0.0]}, r"FinetuneConfig.augment.speed_factors must be a non-empty"),
    ("finetune", {"speed_factors": 1.1}, r"FinetuneConfig.augment: .*float"),
    ("pretrain", {"noise_snr_db": [20, 5]}, r"PretrainConfig.augment.noise_snr_db must be \[low, high\]"),
    ("finetune", {"noise_prob": 2.0}, r"FinetuneConfig.augment.noise_prob must be in \[0, 1\]"),
    ("finetune", {"noise_files": ["a.wav"]}, "FinetuneConfig.augment.noise_files need noise_snr_db"),
    ("finetune", {"spec_time_masks": -1}, "FinetuneConfig.augment.spec_time_masks must be a non-negative"),
    ("finetune", {"spec_freq_width": 0}, "FinetuneConfig.augment.spec_freq_width must be a positive"),
    ("finetune", {"spec_time_ratio": 0.0}, r"FinetuneConfig.augment.spec_time_ratio must be in \(0, 1\]"),
    ("finetune", {"pitch": 2}, r"FinetuneConfig.augment has unknown keys \['pitch'\]"),
    ("pretrain", {"spec_time_masks": 2}, "PretrainConfig.augment: SpecAugment .* is for fine-tuning"),
])
def test_impossible_augmentation_is_refused(kind, augment, match):
    with pytest.raises(ValueError, match=match):
        build_config(kind, "tiny", None, [("augment", augment)])


def test_augmentation_settings_round_trip_through_yaml(tmp_path):
    from streamssl.train.config import FinetuneConfig

    config = build_config("finetune", "tiny", None, [("augment", {"speed_factors": [0.9, 1.0, 1.1],
                                                                  "spec_time_masks": 2})])
    config.save(tmp_path / "config.yaml")
    loaded = FinetuneConfig.load(tmp_path / "config.yaml")
    assert loaded.augment == config.augment
    assert loaded.augment_options().speed_factors == (0.9, 1.0, 1.1)
    assert np.isclose(loaded.augment_options().spec_time_ratio, 0.2)


def test_training_audio_is_loaded_at_the_encoder_sample_rate(utterances):
    from streamssl.train.tasks import FinetuneTask

    config = build_config("finetune", "tiny", None, [("encoder.frontend", "fbank"), ("encoder.sample_rate", 8000)])
    task = FinetuneTask(config, log=lambda *a: None)
    assert task.sample_rate == 8000
    at_16k = AugmentOptions().dataset(utterances, 16000, 0)[0]["audio"]
    at_8k = config.augment_options().dataset(utterances, task.sample_rate, 0)[0]["audio"]
    assert at_8k.shape[0] == at_16k.shape[0] // 2  # the 16 kHz files are resampled, not read as 8 kHz
