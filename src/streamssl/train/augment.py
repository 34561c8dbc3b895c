"""Training-time augmentation, configured by the ``augment`` mapping of a run configuration.

Waveform augmentation happens in the data pipeline (:class:`streamssl.data.AudioDataset`, which owns
the implementations): speed perturbation (soxr resampling, so 1.1 is 10 % faster and shorter, pitch
shifted with it, as in Kaldi recipes) and additive noise at an SNR drawn uniformly from a range (white
noise, or recordings from ``noise_files``). Each utterance's draws come from a generator seeded by
(run seed, epoch, utterance index), so they do not depend on batching, workers or ranks.

SpecAugment (Park et al., 2019) masks the frontend's spectral features in the model's forward pass
during fine-tuning: ``spec_freq_masks`` bands of up to ``spec_freq_width`` bins and ``spec_time_masks``
spans of up to ``spec_time_width`` frames (and at most ``spec_time_ratio`` of the utterance each) are
set to zero (with the ``fbank`` frontend: the global mean of the normalised log-mel). The frames and
bins are those of the frontend's spectral features: 10 ms log-mel frames and mel bins for ``fbank``,
output frames and channels for ``conv``, input frames for ``none``. The masks of an utterance at a step
come from a generator seeded by (run seed, step, utterance id), so a resumed run masks exactly as an
uninterrupted one. Pretraining takes no SpecAugment: the wav2vec 2.0 objective masks spans itself and
quantises the features it would mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from streamssl.data import AdditiveNoise, AudioDataset
from streamssl.frontends import FeatureAugment


@dataclass
class AugmentOptions:
    """The fields of a run configuration's ``augment`` mapping (every augmentation is off by default)."""

    speed_factors: tuple[float, ...] | None = None     # e.g. [0.9, 1.0, 1.1], one drawn per utterance
    noise_snr_db: tuple[float, float] | None = None    # [low, high]: additive noise at a uniform SNR
    noise_prob: float = 1.0                            # chance an utterance gets noise
    noise_files: tuple[str, ...] = ()                  # noise recordings; white noise when empty
    spec_freq_masks: int = 0
    spec_freq_width: int = 27
    spec_time_masks: int = 0
    spec_time_width: int = 40
    spec_time_ratio: float = 0.2

    def __post_init__(self) -> None:
        def fail(name: str, message: str) -> ValueError:
            return ValueError(f"augment.{name} {message}")

        if self.speed_factors is not None:
            self.speed_factors = tuple(float(f) for f in self.speed_factors)
            if not self.speed_factors or any(not f > 0 for f in self.speed_factors):
                raise fail("speed_factors", f"must be a non-empty list of positive factors, got {self.speed_factors}")
        if self.noise_snr_db is not None:
            snr = tuple(float(v) for v in self.noise_snr_db)
            if len(snr) != 2 or snr[0] > snr[1]:
                raise fail("noise_snr_db", f"must be [low, high] with low <= high, got {self.noise_snr_db}")
            self.noise_snr_db = snr
        if not 0.0 <= self.noise_prob <= 1.0:
            raise fail("noise_prob", f"must be in [0, 1], got {self.noise_prob}")
        self.noise_files = tuple(str(f) for f in self.noise_files)
        if self.noise_files and self.noise_snr_db is None:
            raise fail("noise_files", "need noise_snr_db, the SNR range to mix them at")
        for name in ("spec_freq_masks", "spec_time_masks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(name, f"must be a non-negative integer, got {value!r}")
        for name in ("spec_freq_width", "spec_time_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise fail(name, f"must be a positive integer, got {value!r}")
        if not 0.0 < self.spec_time_ratio <= 1.0:
            raise fail("spec_time_ratio", f"must be in (0, 1], got {self.spec_time_ratio}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "AugmentOptions":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"augment has unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as error:  # a value of the wrong kind, e.g. a number where a list belongs
            raise ValueError(f"augment: {error}") from None

    @property
    def spec_augment(self) -> bool:
        return self.spec_freq_masks > 0 or self.spec_time_masks > 0

    def noise(self) -> AdditiveNoise | None:
        if self.noise_snr_db is None:
            return None
        return AdditiveNoise(snr_db=self.noise_snr_db, files=self.noise_files, probability=self.noise_prob)

    def dataset(self, utterances: list, sample_rate: int, seed: int) -> AudioDataset:
        """The training utterances as waveforms at ``sample_rate``, speed-perturbed and noised as set."""
        return AudioDataset(utterances, sample_rate=sample_rate, noise=self.noise(),
                            speed_perturb=self.speed_factors, seed=seed)


class SpecAugment:
    """Seeded time and frequency masks; :meth:`for_batch` gives the frontend's ``augment`` callable."""

    def __init__(self, options: AugmentOptions):
        self.options = options

    def masks(self, frames: int, bins: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
        """Boolean ``(frames,)`` time mask and ``(bins,)`` frequency mask of one utterance of ``length``
        valid frames (the time masks fall inside them)."""
        opts = self.options
        g = torch.Generator().manual_seed(seed)
        freq = torch.zeros(bins, dtype=torch.bool)
        for _ in range(opts.spec_freq_masks):
            width = int(torch.randint(min(opts.spec_freq_width, bins) + 1, (), generator=g))
            start = int(torch.randint(bins - width + 1, (), generator=g))
            freq[start:start + width] = True
        time = torch.zeros(frames, dtype=torch.bool)
        longest = min(opts.spec_time_width, int(opts.spec_time_ratio * length))
        for _ in range(opts.spec_time_masks if longest > 0 else 0):
            width = int(torch.randint(longest + 1, (), generator=g))
            start = int(torch.randint(length - width + 1, (), generator=g))
            time[start:start + width] = True
        return time, freq

    def for_batch(self, seeds: list[int]) -> FeatureAugment:
        """Masks for a batch: ``seeds[b]`` draws utterance ``b``'s."""

        def augment(feats: Tensor, lengths: Tensor) -> Tensor:
            batch, frames, bins = feats.shape
            keep = torch.ones(batch, frames, bins, dtype=torch.bool)
            for b, (length, seed) in enumerate(zip(lengths.tolist(), seeds)):
                time, freq = self.masks(frames, bins, length, seed)
                keep[b] &= ~(time[:, None] | freq[None, :])
            return feats * keep.to(device=feats.device, dtype=feats.dtype)

        return augment
