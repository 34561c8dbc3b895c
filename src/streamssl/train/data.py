"""Training data through :mod:`streamssl.data`: checked corpora, duration-bucketed batches that resume
mid-epoch, random crops keyed by utterance.

Two pipelines share one interface (``iterate(epoch, start)``): :class:`EpochBatches` for corpora held as a
list of utterances (manifests, folders), and :class:`CutBatches` for Lhotse data (a cut manifest or Shar
shards, see :mod:`streamssl.data.lhotse`), read lazily and batched by Lhotse's ``DynamicBucketingSampler``.
"""

from __future__ import annotations

import itertools
import logging
import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from streamssl.data import AudioDataset, DurationBatchSampler, collate
from streamssl.data.lhotse import CutUtterance, checked_cuts, cut_utterance, open_cuts, require_lhotse, shar_shards
from streamssl.data.problems import Problem
from streamssl.data.readers import corpus_layout, scan_corpus
from streamssl.train.dist import World

logger = logging.getLogger(__name__)


def _refuse(problems: list[Problem], what: str, src: str) -> None:
    listing = "\n".join(f"  {p}" for p in problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    raise ValueError(f"{what} {src} fails `streamssl corpus check` ({len(problems)} problems):\n"
                     f"{listing}{more}\nfix them, or pass --skip-bad to skip those utterances")


def load_split(src: str, skip_bad: bool, what: str, vocab=None, log=print, lazy: bool = False,
               sample_size: int = 0, seed: int = 0) -> "list | CutSplit":
    """Utterances of ``src`` after ``corpus check`` (every file decoded in full).

    Problems raise ``ValueError`` listing every one, unless ``skip_bad``: then every utterance with a
    problem is left out and reported through ``log``, so what is reported as skipped is never used.
    With a ``vocab``, transcripts must be spelt in it too (see :func:`spellable`).

    With ``lazy``, Lhotse data (a cut manifest or Shar folder) is not read into a list: the result is a
    :class:`CutSplit` (see :func:`load_cut_split`, which ``sample_size`` and ``seed`` are for).
    """
    if lazy and corpus_layout(src) in ("lhotse", "shar"):
        return load_cut_split(src, skip_bad, what, vocab, log, sample_size, seed)
    scan = scan_corpus(src, decode=True)
    problems = scan.problems
    if problems and not skip_bad:
        _refuse(problems, what, src)
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


@dataclass
class CutSplit:
    """Lhotse training data, checked but not loaded: what :func:`load_cut_split` found.

    ``skipped``: ids of the cuts with a problem (left out); ``repeated``: ids that occur more than once
    (only the first occurrence is used); ``sample``: up to ``sample_size`` usable utterances that can load
    their audio (the frontend statistics' sample); ``shard_utterances``: usable utterances per shard of a
    Shar folder (empty for a cut manifest).
    """

    src: str
    layout: str
    utterances: int
    seconds: float
    skipped: frozenset[str]
    repeated: frozenset[str]
    sample: list[CutUtterance]
    shard_utterances: list[int]
    skip_bad: bool

    @property
    def shards(self) -> int:
        return len(self.shard_utterances)


def load_cut_split(src: str, skip_bad: bool, what: str, vocab=None, log=print, sample_size: int = 0,
                   seed: int = 0) -> CutSplit:
    """Check Lhotse data as :func:`load_split` checks a corpus, from its metadata alone (nothing but the
    cut manifests is read): recordings and audio files present, durations, transcripts that normalise
    (and, with ``vocab``, spell), unique ids. Audio that fails to decode is found as it is loaded for
    training, and then stops the run naming the cut, or with ``skip_bad`` is left out of its batch and
    reported (a warning of ``streamssl.train.data``).

    The statistics sample: ``sample_size`` cuts drawn by ``seed`` over the whole of a cut manifest, or the
    first of a Shar folder's shards in a seeded order (sequential reads: shards written by ``corpus
    shard`` hold shuffled cuts).
    """
    layout = corpus_layout(src)
    cuts = open_cuts(src, audio=False)
    problems: list[Problem] = []
    skipped: set[str] = set()
    repeated: set[str] = set()
    count, seconds = 0, 0.0
    draw = random.Random(seed)
    sample: list[CutUtterance] = []
    shard_index = {cuts_path: i for i, (cuts_path, _) in enumerate(shar_shards(src))} if layout == "shar" else {}
    per_shard = [0] * len(shard_index)
    for cut, utt, found in checked_cuts(cuts, src):
        if utt is not None and vocab is not None:
            try:
                vocab.encode(utt.text)
            except ValueError as error:
                if not skip_bad:
                    raise ValueError(f"{what} {src}: utterance {utt.id}: {error}") from None
                log(f"skipped ({what}): utterance {utt.id}: {error}")
                skipped.add(utt.id)
                continue
        if utt is None:
            problems.extend(found)
            (repeated if found[0].kind == "duplicate-id" else skipped).add(cut.id)
            continue
        count += 1
        seconds += utt.duration
        if shard_index:
            per_shard[shard_index[cut.custom["shard_origin"]]] += 1
        # Reservoir sampling: every usable cut of the manifest is equally likely to be in the sample.
        if layout == "lhotse" and len(sample) < sample_size:
            sample.append(utt)
        elif layout == "lhotse" and sample_size and (slot := draw.randrange(count)) < sample_size:
            sample[slot] = utt
    if problems and not skip_bad:
        _refuse(problems, what, src)
    for problem in problems:
        log(f"skipped ({what}): {problem}")
    if not count:
        raise ValueError(f"{what} {src} holds no usable utterances")
    split = CutSplit(src, layout, count, seconds, frozenset(skipped), frozenset(repeated), sample, per_shard,
                     skip_bad)
    if layout == "shar" and sample_size:
        order = np.random.default_rng(seed).permutation(split.shards).tolist()
        picked = itertools.islice(_usable(open_cuts(src, shards=order), split), sample_size)
        split.sample = [cut_utterance(cut, src, []) for cut in picked]
    return split


def cut_texts(split: CutSplit) -> list[str]:
    """The transcripts of the utterances a :class:`CutSplit` uses (its cut manifests read once more)."""
    texts = []
    for _, utt, _ in checked_cuts(_usable(open_cuts(split.src, audio=False), split), split.src):
        if utt is not None:
            texts.append(utt.text)
    return texts


class _Usable:
    """Lazy CutSet filter: the cuts a :class:`CutSplit` uses (a repeated id only the first time)."""

    def __init__(self, split: CutSplit):
        self.skipped, self.repeated, self.seen = split.skipped, split.repeated, set()

    def __call__(self, cut: Any) -> bool:
        if cut.id in self.skipped:
            return False
        if cut.id in self.repeated:
            if cut.id in self.seen:
                return False
            self.seen.add(cut.id)
        return True


def _usable(cuts: Any, split: CutSplit) -> Any:
    return cuts.filter(_Usable(split)) if split.skipped or split.repeated else cuts


def stable_key(utt_id: str) -> int:
    """A number for ``utt_id`` that is the same in every process (``hash`` is salted per process)."""
    return zlib.crc32(utt_id.encode("utf-8"))


class _Crop:
    """Lazy CutSet map: cuts longer than ``seconds`` become a window of it at an offset drawn by
    ``(seed, epoch, id)``, so only the window's audio is read."""

    def __init__(self, seconds: float, seed: int, epoch: int):
        self.seconds, self.seed, self.epoch = seconds, seed, epoch

    def __call__(self, cut: Any) -> Any:
        if cut.duration <= self.seconds:
            return cut
        rng = np.random.default_rng([self.seed, self.epoch, stable_key(cut.id)])
        offset = float(rng.uniform(0.0, cut.duration - self.seconds))
        return cut.truncate(offset=offset, duration=self.seconds, preserve_id=True)


class _CutLoader(torch.utils.data.Dataset):
    """A batch of cuts (what the sampler yields) -> a collated batch, or None if every cut failed to load
    under ``skip_bad``. Items are augmented as :class:`AudioDataset` augments them, keyed by id."""

    def __init__(self, dataset: AudioDataset, split: CutSplit, what: str):
        self.dataset, self.split, self.what = dataset, split, what

    def __getitem__(self, cuts: Any) -> dict | None:
        items = []
        for cut in cuts:
            problems: list[Problem] = []
            utt = cut_utterance(cut, self.split.src, problems, check_files=False)
            if utt is None:
                raise ValueError(f"{self.what} {self.split.src}: {problems[0]}")
            try:
                items.append(self.dataset.item(utt, stable_key(utt.id)))
            except ValueError as error:
                if not self.split.skip_bad:
                    raise ValueError(f"{self.what} {self.split.src}: {error}; fix it, or pass --skip-bad to skip "
                                     "utterances whose audio does not load") from None
                logger.warning("skipped (%s): %s", self.what, error)
        return collate(items) if items else None


class _FromBatch:
    """The sampler's batches from number ``start`` on (resuming mid-epoch)."""

    def __init__(self, sampler: Any, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.start, None)


def _while_every_rank_has_one(batches: Iterable[dict | None], world: World) -> Iterator[dict]:
    """The non-empty batches of ``batches`` while every rank still has one, so that DDP ranks take the
    same number of steps from data whose batch count per rank is not known in advance."""
    remaining = (batch for batch in batches if batch is not None)
    while True:
        batch = next(remaining, None)
        if world.min_int(int(batch is not None)) == 0:
            return
        yield batch


class CutBatches:
    """Batches of one rank from Lhotse data, epoch by epoch, able to start in the middle of an epoch.

    Batching is Lhotse's ``DynamicBucketingSampler``: ``num_buckets`` duration buckets (1: no buckets, Lhotse's
    ``DynamicCutSampler``), shuffled by
    ``(seed, epoch)``, at most ``max_batch_seconds`` of audio per batch (the sum of durations, after the
    crop; Lhotse does not count padding). Ranks get disjoint data: a cut manifest is split by the sampler
    (rank ``r`` takes every ``r``-th batch), a Shar folder by shards (each epoch, a seeded permutation of
    the shards, rank ``r`` reading every ``r``-th one), so that each rank reads only its own tars. Every
    rank takes as many batches as the rank with the fewest.
    """

    def __init__(self, split: CutSplit, max_batch_seconds: float, seed: int, world: World, dataset: AudioDataset,
                 num_workers: int = 0, crop_seconds: float | None = None, num_buckets: int = 30,
                 what: str = "training data"):
        require_lhotse()
        if split.layout == "shar" and split.shards < world.size:
            raise ValueError(f"{split.src} holds {split.shards} Shar shard(s), fewer than the {world.size} "
                             "processes that each read their own; write smaller shards (streamssl corpus shard "
                             "--shard-size)")
        self.split, self.max_batch_seconds, self.seed, self.world = split, max_batch_seconds, seed, world
        self.dataset, self.num_workers, self.crop_seconds, self.num_buckets = dataset, num_workers, crop_seconds, num_buckets
        self.what = what

    def shards(self, epoch: int) -> list[int] | None:
        """The Shar shards this rank reads in ``epoch``, in reading order (None for a cut manifest)."""
        if self.split.layout != "shar":
            return None
        order = np.random.default_rng([self.seed, epoch]).permutation(self.split.shards).tolist()
        return order[self.world.rank::self.world.size]

    def sampler(self, epoch: int) -> Any:
        """This rank's ``DynamicBucketingSampler`` for ``epoch``; it yields ``CutSet`` batches."""
        from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler

        shards = self.shards(epoch)
        cuts = _usable(open_cuts(self.split.src, shards=shards), self.split)
        if self.crop_seconds:
            cuts = cuts.map(_Crop(self.crop_seconds, self.seed, epoch))
        by_shard = shards is not None
        cuts_read = self.split.utterances if shards is None else sum(self.split.shard_utterances[i] for i in shards)
        # Lhotse estimates the bucket edges from the cuts and needs at least one per bucket.
        buckets = min(self.num_buckets, cuts_read)
        common = dict(max_duration=self.max_batch_seconds, shuffle=True, seed=self.seed, drop_last=False,
                      world_size=1 if by_shard else self.world.size, rank=0 if by_shard else self.world.rank)
        if buckets <= 1:
            sampler = DynamicCutSampler(cuts, **common)
        else:
            sampler = DynamicBucketingSampler(cuts, num_buckets=buckets, **common)
        sampler.set_epoch(epoch)
        return sampler

    def iterate(self, epoch: int, start: int) -> Iterator[dict]:
        """Collated batches of ``epoch`` from batch number ``start`` on."""
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        loader = DataLoader(_CutLoader(self.dataset, self.split, self.what),
                            sampler=_FromBatch(self.sampler(epoch), start), batch_size=None,
                            num_workers=self.num_workers, generator=generator, persistent_workers=False)
        return _while_every_rank_has_one(loader, self.world)


def training_batches(train: "list | CutSplit", config: Any, world: World, dataset: AudioDataset
                     ) -> EpochBatches | CutBatches:
    """The batches of a run's training data: ``train`` from :func:`load_split`, ``dataset`` what loads and
    augments its utterances (a run configuration's ``augment_options().dataset``)."""
    if isinstance(train, CutSplit):
        return CutBatches(train, config.max_batch_seconds, config.seed, world, dataset, config.num_workers,
                          config.crop_seconds, config.num_buckets)
    return EpochBatches(train, config.max_batch_seconds, config.seed, world, config.num_workers,
                        config.crop_seconds, dataset)
