"""A waveform dataset with optional augmentation, its collate function, and a duration-budget batch sampler."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from streamssl.data.audio import SAMPLE_RATE, load_audio, resample
from streamssl.data.manifest import Utterance

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdditiveNoise:
    """Additive-noise augmentation.

    Attributes:
        snr_db: (low, high) range of signal-to-noise ratios in dB; each item draws one uniformly.
        files: noise recordings to mix in (a random file, at a random offset, looped if short); white Gaussian
            noise when empty.
        probability: chance that an item gets noise at all.
    """

    snr_db: tuple[float, float] = (10.0, 30.0)
    files: tuple[str, ...] = ()
    probability: float = 1.0

    def __post_init__(self) -> None:
        low, high = self.snr_db
        if low > high:
            raise ValueError(f"snr_db must be (low, high) with low <= high, got {self.snr_db}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    def apply(self, audio: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``audio`` (float32, shape (S,)) with noise added at an SNR drawn from ``snr_db``."""
        if rng.random() >= self.probability or audio.size == 0:
            return audio
        snr_db = rng.uniform(*self.snr_db)
        if self.files:
            source = load_audio(self.files[int(rng.integers(len(self.files)))], sample_rate)
            if source.size == 0:
                raise ValueError("a noise file holds no samples")
            start = int(rng.integers(source.size))
            noise = np.resize(np.roll(source, -start), audio.size).astype(np.float64)
        else:
            noise = rng.standard_normal(audio.size)
        signal_power = float(np.mean(audio.astype(np.float64) ** 2))
        noise_power = float(np.mean(noise ** 2))
        if signal_power == 0.0 or noise_power == 0.0:
            return audio
        scale = math.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
        return (audio + scale * noise).astype(np.float32)


class AudioDataset(torch.utils.data.Dataset):
    """Utterances as waveforms, optionally augmented.

    ``dataset[i]`` is ``{"id": str, "audio": FloatTensor (S,) at sample_rate, "text": str, "speaker": str}``.

    Augmentation is random but reproducible: item ``i`` in epoch ``e`` draws from a generator seeded by
    ``(seed, e, i)``, whatever worker loads it. Call :meth:`set_epoch` each epoch (with a DataLoader's default
    ``persistent_workers=False`` the workers then see the new epoch).

    Args:
        utterances: what to load (e.g. from :func:`streamssl.data.load_utterances`).
        sample_rate: output rate in Hz; files at other rates are resampled.
        noise: additive-noise augmentation, or None.
        speed_perturb: speed factors to choose from uniformly per item, e.g. ``(0.9, 1.0, 1.1)`` (1.1 = 10 %
            faster and shorter, pitch shifted with it, as in Kaldi-style speed perturbation), or None.
        seed: augmentation seed.
    """

    def __init__(self, utterances: Sequence[Utterance], sample_rate: int = SAMPLE_RATE,
                 noise: AdditiveNoise | None = None, speed_perturb: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        if speed_perturb is not None and (not speed_perturb or any(not f > 0 for f in speed_perturb)):
            raise ValueError(f"speed_perturb must be a non-empty list of positive factors, got {speed_perturb}")
        self.utterances = list(utterances)
        self.sample_rate = sample_rate
        self.noise = noise
        self.speed_perturb = tuple(speed_perturb) if speed_perturb is not None else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws ``__getitem__`` makes."""
        self.epoch = epoch

    @property
    def durations(self) -> list[float]:
        """Each utterance's duration in seconds before speed perturbation (for :class:`DurationBatchSampler`)."""
        return [utt.duration for utt in self.utterances]

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict:
        return self.item(self.utterances[index], index)

    def item(self, utt: Utterance, key: int) -> dict:
        """``utt`` loaded and augmented as item ``key`` would be (``__getitem__`` uses its index; a lazily
        read corpus, which has no indices, a stable number derived from the id)."""
        try:
            audio = utt.read_audio(self.sample_rate)
        except ValueError as error:
            raise ValueError(f"utterance {utt.id}: {error}") from None
        if self.speed_perturb is not None or self.noise is not None:
            rng = np.random.default_rng([self.seed, self.epoch, key])
            if self.speed_perturb is not None:
                factor = self.speed_perturb[int(rng.integers(len(self.speed_perturb)))]
                # Reading samples recorded at rate*factor as if at rate changes speed (and pitch) by factor.
                audio = resample(audio, round(self.sample_rate * factor), self.sample_rate)
            if self.noise is not None:
                audio = self.noise.apply(audio, self.sample_rate, rng)
        return {"id": utt.id, "audio": torch.from_numpy(np.ascontiguousarray(audio)), "text": utt.text,
                "speaker": utt.speaker}


def collate(items: list[dict]) -> dict:
    """Batch dataset items: ``{"ids": list[str], "audio": FloatTensor (B, S_max) zero-padded at the end,
    "lengths": LongTensor (B,) valid samples per row, "texts": list[str], "speakers": list[str]}``."""
    lengths = torch.tensor([item["audio"].shape[0] for item in items], dtype=torch.long)
    audio = torch.zeros(len(items), int(lengths.max()) if items else 0, dtype=torch.float32)
    for row, item in enumerate(items):
        audio[row, : item["audio"].shape[0]] = item["audio"]
    return {"ids": [item["id"] for item in items], "audio": audio, "lengths": lengths,
            "texts": [item["text"] for item in items], "speakers": [item["speaker"] for item in items]}


class DurationBatchSampler(torch.utils.data.Sampler):
    """Batches of utterance indices whose padded audio fits a duration budget, shuffled per epoch, sharded by rank.

    Each epoch, indices are shuffled (by ``(seed, epoch)``), cut into buckets of ``bucket_size``, and each bucket
    is sorted by duration and cut greedily into batches whose padded duration (size x longest utterance) is at
    most ``max_batch_seconds``; an utterance longer than the budget forms a batch of its own. The batch order is
    then shuffled.

    Ranks: every rank builds the same global batch list and takes every ``num_replicas``-th batch, so ranks get
    disjoint utterances and together every utterance exactly once per epoch. To give ranks equal numbers of
    batches (DDP steps in lockstep), the global list is first brought to a multiple of ``num_replicas`` by
    splitting the longest batches in two (no utterance dropped or repeated); only if too few batches can be
    split (nearly all batches are single utterances) are the shortest batches merged instead, which may then
    exceed the budget. Ranks get equal batch counts, not equal audio.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=...)`` and call
    :meth:`set_epoch` before each epoch.

    Args:
        durations: seconds per utterance, indexed like the dataset.
        max_batch_seconds: padded audio per batch, in seconds.
        seed: shuffling seed; the batches are a function of (seed, epoch) only.
        shuffle: shuffle utterances and batch order; if False, batches come in order of increasing duration.
        num_replicas: number of distributed ranks.
        rank: this rank, in ``[0, num_replicas)``.
        bucket_size: utterances per length bucket (larger: less padding, less randomness in batch make-up).
    """

    def __init__(self, durations: Sequence[float], max_batch_seconds: float, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0, bucket_size: int = 1000) -> None:
        self.durations = np.asarray(durations, dtype=np.float64)
        if self.durations.ndim != 1 or self.durations.size == 0:
            raise ValueError("durations must be a non-empty list of seconds")
        if not np.isfinite(self.durations).all() or (self.durations < 0).any():
            raise ValueError("durations must be finite and non-negative")
        if not max_batch_seconds > 0:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=}, {rank=}")
        if self.durations.size < num_replicas:
            raise ValueError(f"{self.durations.size} utterance(s) cannot give each of {num_replicas} ranks a batch")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be at least 1, got {bucket_size}")
        self.max_batch_seconds = float(max_batch_seconds)
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.bucket_size = bucket_size
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        oversized = int((self.durations > self.max_batch_seconds).sum())
        if oversized:
            logger.warning("%d utterance(s) are longer than max_batch_seconds=%g; each forms a batch of its own",
                           oversized, self.max_batch_seconds)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle ``__iter__`` and ``__len__`` use."""
        self.epoch = epoch

    def _padded_s(self, batch: list[int]) -> float:
        return len(batch) * float(self.durations[batch].max())

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches for ``epoch`` (default: the current one); rank ``r`` gets ``[r::num_replicas]``."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.durations.size) if self.shuffle else np.arange(self.durations.size)
        batches: list[list[int]] = []
        for start in range(0, order.size, self.bucket_size):
            bucket = order[start:start + self.bucket_size]
            bucket = bucket[np.argsort(self.durations[bucket], kind="stable")]
            batch: list[int] = []
            for index in bucket.tolist():
                # Sorted ascending, so this utterance is the batch's longest.
                if batch and (len(batch) + 1) * self.durations[index] > self.max_batch_seconds:
                    batches.append(batch)
                    batch = []
                batch.append(index)
            batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        batches = self._equalize(batches)
        self._cache = (epoch, batches)
        return batches

    def _equalize(self, batches: list[list[int]]) -> list[list[int]]:
        """Bring the number of batches to a multiple of ``num_replicas`` without dropping or repeating any index."""
        remainder = len(batches) % self.num_replicas
        if remainder == 0:
            return batches
        needed = self.num_replicas - remainder
        if sum(len(batch) - 1 for batch in batches) >= needed:
            for _ in range(needed):
                splittable = [i for i, batch in enumerate(batches) if len(batch) > 1]
                target = max(splittable, key=lambda i: self._padded_s(batches[i]))
                batch = batches[target]
                batches[target:target + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
            return batches
        for _ in range(remainder):
            first, second = sorted(range(len(batches)), key=lambda i: self._padded_s(batches[i]))[:2]
            merged = batches[first] + batches[second]
            batches = [batch for i, batch in enumerate(batches) if i not in (first, second)]
            batches.insert(min(first, second), merged)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(batch) for batch in self.global_batches()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return len(self.global_batches()) // self.num_replicas
