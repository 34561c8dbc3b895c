"""The duration batch sampler, the dataset's augmentation and collate, and a multi-worker DataLoader."""

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamssl.data import AdditiveNoise, AudioDataset, DurationBatchSampler, Utterance, collate


@settings(max_examples=150, deadline=None)
@given(durations=st.lists(st.floats(0.0, 30.0), min_size=1, max_size=80),
       max_batch_seconds=st.floats(0.5, 60.0), num_replicas=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       epoch=st.integers(0, 1000), bucket_size=st.integers(1, 100), shuffle=st.booleans())
def test_every_utterance_exactly_once_per_epoch_across_ranks(durations, max_batch_seconds, num_replicas, seed,
                                                             epoch, bucket_size, shuffle):
    if len(durations) < num_replicas:
        with pytest.raises(ValueError, match="cannot give each"):
            DurationBatchSampler(durations, max_batch_seconds, num_replicas=num_replicas)
        return
    per_rank = []
    for rank in range(num_replicas):
        sampler = DurationBatchSampler(durations, max_batch_seconds, seed=seed, shuffle=shuffle,
                                       num_replicas=num_replicas, rank=rank, bucket_size=bucket_size)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) > 0
        assert all(batches)
        per_rank.append(batches)
    assert len({len(batches) for batches in per_rank}) == 1  # ranks step in lockstep
    indices = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(indices) == list(range(len(durations)))
    over_budget = [b for batches in per_rank for b in batches
                   if len(b) > 1 and len(b) * max(durations[i] for i in b) > max_batch_seconds]
    assert len(over_budget) < num_replicas  # only batches merged to equalise counts may exceed the budget


def test_deterministic_per_seed_and_epoch():
    durations = np.random.default_rng(0).uniform(1, 20, size=500).tolist()
    first = DurationBatchSampler(durations, 60, seed=3)
    second = DurationBatchSampler(durations, 60, seed=3)
    second.set_epoch(1)
    second.set_epoch(0)
    assert list(first) == list(second)
    first.set_epoch(1)
    assert list(first) != list(second)
    assert list(first) == list(first)
    assert list(DurationBatchSampler(durations, 60, seed=4)) != list(second)


def test_batches_are_length_bucketed_and_within_budget():
    durations = np.random.default_rng(1).uniform(1, 20, size=1000).tolist()
    sampler = DurationBatchSampler(durations, 100, bucket_size=1000)
    padded = [len(b) * max(durations[i] for i in b) for b in sampler]
    real = [sum(durations[i] for i in b) for b in sampler]
    assert max(padded) <= 100
    assert sum(real) / sum(padded) > 0.95  # sorting within a bucket keeps padding small


def test_oversized_utterances_get_batches_of_their_own(caplog):
    sampler = DurationBatchSampler([5.0, 50.0, 4.0, 70.0], 10, shuffle=False)
    assert list(sampler) == [[2, 0], [1], [3]]
    assert "2 utterance(s) are longer than max_batch_seconds=10" in caplog.text


def test_ranks_equalised_by_splitting_else_merging():
    # One batch of three for two ranks: split, so no rank idles and nothing exceeds the budget.
    split = [list(DurationBatchSampler([1.0, 1.0, 1.0], 10, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    assert split == [[[0]], [[1, 2]]]
    # Five utterances over budget, each its own batch, for two ranks: nothing to split, so the two shortest merge.
    merged = [list(DurationBatchSampler([50.0, 60.0, 70.0, 80.0, 90.0], 10, shuffle=False, num_replicas=2, rank=r))
              for r in (0, 1)]
    assert merged == [[[0, 1], [3]], [[2], [4]]]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        DurationBatchSampler([], 10)
    with pytest.raises(ValueError, match="finite and non-negative"):
        DurationBatchSampler([1.0, float("nan")], 10)
    with pytest.raises(ValueError, match="rank"):
        DurationBatchSampler([1.0, 2.0], 10, num_replicas=2, rank=2)


@pytest.fixture(scope="module")
def tone_utterances(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tones")
    utterances = []
    for index in range(12):
        samples = 4000 + 1000 * index
        audio = 0.5 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000).astype(np.float32)
        path = folder / f"u{index:02d}.flac"
        soundfile.write(path, audio, 16000)
        utterances.append(Utterance(f"u{index:02d}", str(path), samples / 16000, f"TONE {index}", f"s{index % 3}"))
    return utterances


def test_dataset_item_and_collate(tone_utterances):
    dataset = AudioDataset(tone_utterances)
    item = dataset[3]
    assert item["id"] == "u03" and item["text"] == "TONE 3" and item["speaker"] == "s0"
    assert item["audio"].dtype == torch.float32 and item["audio"].shape == (7000,)
    batch = collate([dataset[0], dataset[3]])
    assert batch["ids"] == ["u00", "u03"] and batch["texts"] == ["TONE 0", "TONE 3"]
    assert batch["audio"].shape == (2, 7000) and batch["lengths"].tolist() == [4000, 7000]
    assert torch.equal(batch["audio"][0, :4000], dataset[0]["audio"]) and not batch["audio"][0, 4000:].any()


def test_speed_perturbation_changes_length(tone_utterances):
    dataset = AudioDataset(tone_utterances, speed_perturb=(1.25,))
    assert dataset[0]["audio"].shape[0] == pytest.approx(4000 / 1.25, abs=2)
    slow = AudioDataset(tone_utterances, speed_perturb=(0.8,))
    assert slow[0]["audio"].shape[0] == pytest.approx(4000 / 0.8, abs=2)
    with pytest.raises(ValueError, match="positive"):
        AudioDataset(tone_utterances, speed_perturb=(0.0,))


def test_additive_noise_snr_and_reproducibility(tone_utterances, tmp_path):
    clean = AudioDataset(tone_utterances)[5]["audio"].double()
    noisy_set = AudioDataset(tone_utterances, noise=AdditiveNoise(snr_db=(10.0, 10.0)), seed=1)
    noisy = noisy_set[5]["audio"].double()
    snr_db = 10 * torch.log10((clean ** 2).sum() / ((noisy - clean) ** 2).sum())
    assert float(snr_db) == pytest.approx(10.0, abs=1e-3)
    assert torch.equal(noisy_set[5]["audio"], noisy_set[5]["audio"])
    noisy_set.set_epoch(1)
    assert not torch.equal(noisy_set[5]["audio"].double(), noisy)
    noise_file = tmp_path / "hum.wav"
    soundfile.write(noise_file, np.random.default_rng(0).uniform(-1, 1, 3000).astype(np.float32), 8000)
    from_file = AudioDataset(tone_utterances, noise=AdditiveNoise(snr_db=(5.0, 5.0), files=(str(noise_file),)))
    mixed = from_file[5]["audio"].double()
    assert float(10 * torch.log10((clean ** 2).sum() / ((mixed - clean) ** 2).sum())) == pytest.approx(5.0, abs=1e-3)


def test_multi_worker_dataloader_across_ranks(tone_utterances):
    dataset = AudioDataset(tone_utterances)
    seen = []
    for rank in range(2):
        sampler = DurationBatchSampler(dataset.durations, max_batch_seconds=2.0, seed=5, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert batch["audio"].shape == (len(batch["ids"]), int(batch["lengths"].max()))
            assert batch["audio"].shape[1] * len(batch["ids"]) <= 2.0 * 16000
            seen += batch["ids"]
    assert sorted(seen) == [utt.id for utt in tone_utterances]
