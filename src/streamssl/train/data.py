"""Training data through :mod:`streamssl.data`: checked corpora, duration-bucketed batches that resume
mid-epoch, random crops keyed by utterance."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from streamssl.data import AudioDataset, DurationBatchSampler, collate
from streamssl.data.readers import scan_corpus
from streamssl.train.dist import World


def load_split(src: str, skip_bad: bool, what: str, vocab=None, log=print) -> list:
    """Utterances of ``src`` after ``corpus check`` (every file decoded in full).

    Problems raise ``ValueError`` listing every one, unless ``skip_bad``: then every utterance with a
    problem is left out and reported through ``log``, so what is reported as skipped is never used.
    With a ``vocab``, transcripts must be spelt in it too (see :func:`spellable`).
    """
    scan = scan_corpus(src, decode=True)
    problems = scan.problems
    if problems and not skip_bad:
        listing = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ValueError(f"{what} {src} fails `streamssl corpus check` ({len(problems)} problems):\n"
                         f"{listing}{more}\nfix them, or pass --skip-bad to skip those utterances")
    for problem in problems:
        log(f"skipped ({what}): {problem}")
    note = scan.resample_note()
    if note:
        log(f"note ({what}): {note}")
    utterances = scan.ordered()
    if vocab is not None:
        utterances = spellable(utterances, vocab, skip_bad, what, src, log)
    if not utterances:
        raise ValueError(f"{what} {src} holds no usable utterances")
    return utterances


def spellable(utterances: list, vocab, skip_bad: bool, what: str, src: str, log=print) -> list:
    """The utterances whose transcripts ``vocab`` can encode; another one is a ``ValueError`` naming it,
    or with ``skip_bad`` is left out and reported through ``log``."""
    kept = []
    for utt in utterances:
        try:
            vocab.encode(utt.text)
            kept.append(utt)
        except ValueError as error:
            if not skip_bad:
                raise ValueError(f"{what} {src}: utterance {utt.id}: {error}") from None
            log(f"skipped ({what}): utterance {utt.id}: {error}")
    if not kept:
        raise ValueError(f"{what} {src} holds no usable utterances")
    return kept


class EpochBatches:
    """Batches of one rank, epoch by epoch, able to start in the middle of an epoch.

    Batching is by total duration (``max_batch_seconds`` per rank); every rank gets the same number of
    batches per epoch (the shortest rank's), so DDP ranks never wait on each other.
    """

    def __init__(self, utterances: list, max_batch_seconds: float, seed: int, world: World,
                 num_workers: int = 0, crop_seconds: float | None = None, dataset: AudioDataset | None = None):
        # ``dataset``: the utterances as loaded for training (sample rate, augmentation); plain 16 kHz if None.
        self.dataset = dataset if dataset is not None else AudioDataset(utterances)
        self.ids = [u.id for u in utterances]
        durations = [min(u.duration, crop_seconds) if crop_seconds else u.duration for u in utterances]
        self.sampler = DurationBatchSampler(durations, max_batch_seconds, seed=seed, shuffle=True,
                                            num_replicas=world.size, rank=world.rank)
        self.world, self.seed, self.num_workers = world, seed, num_workers

    def batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        batches = [list(b) for b in self.sampler]
        return batches[: self.world.min_int(len(batches))]

    def iterate(self, epoch: int, start: int) -> Iterator[dict]:
        """Collated batches of ``epoch`` from batch number ``start`` on."""
        remaining = self.batches(epoch)[start:]
        if not remaining:
            return iter(())
        self.dataset.set_epoch(epoch)
        # A private generator: workers' seeds must not consume the global RNG that dropout uses.
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return iter(DataLoader(self.dataset, batch_sampler=remaining, collate_fn=collate,
                               num_workers=self.num_workers, generator=generator,
                               persistent_workers=False))


def crop_batch(audio: Tensor, lengths: Tensor, max_samples: int, seeds: list[int]) -> tuple[Tensor, Tensor]:
    """Cut every utterance longer than ``max_samples`` to a window at a seeded random offset."""
    if int(lengths.max()) <= max_samples:
        return audio, lengths
    rows, new_lengths = [], []
    for row, length, seed in zip(audio, lengths.tolist(), seeds):
        if length > max_samples:
            offset = int(torch.randint(length - max_samples + 1, (), generator=torch.Generator().manual_seed(seed)))
            row, length = row[offset:offset + max_samples], max_samples
        rows.append(row[:max_samples])
        new_lengths.append(length)
    width = max(new_lengths)
    out = audio.new_zeros(len(rows), width)
    for b, row in enumerate(rows):
        out[b, : min(width, row.shape[0])] = row[:width]
    return out, torch.tensor(new_lengths, dtype=lengths.dtype)
