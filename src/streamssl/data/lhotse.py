"""Lhotse CutSets in and out: a cut manifest (``cuts.jsonl.gz``) and Lhotse Shar shards (a folder of
``cuts.NNNNNN.jsonl.gz`` with ``recording.NNNNNN.tar`` beside each), read and written with the ``lhotse``
package (the optional extra ``pip install 'streamssl[lhotse]'``).

A cut becomes an utterance as the other layouts' files do: its id, its supervisions' texts joined in
time order and normalised, the first supervision's speaker, its duration; :class:`CutUtterance` keeps the
cut, so its audio is whatever Lhotse loads for it (a file, a part of one, a shard's in-memory copy),
averaged to mono and resampled with soxr like :func:`streamssl.data.load_audio`. A cut manifest is
read lazily, line by line, and a Shar folder shard by shard, so neither is ever held whole in memory.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streamssl.data.audio import SAMPLE_RATE, resample
from streamssl.data.manifest import Utterance
from streamssl.data.problems import Problem, check_transcript

CUTS_SUFFIX = ".jsonl.gz"
SHAR_CUTS = "cuts.{index}.jsonl.gz"
SHAR_RECORDING = "recording.{index}.tar"
# Lhotse's own default; a few hundred to a few thousand utterances per shard keep reads sequential.
SHARD_SIZE = 1000
_FIRST_BACKEND_ERROR = re.compile(r"Exception #0 \([^)]*\): <class '[^']*'>: (.*?)(?= Exception #1| Set LHOTSE|$)")


def require_lhotse() -> Any:
    """The ``lhotse`` module, or a ``ValueError`` saying how to install it."""
    try:
        import lhotse
    except ImportError:
        raise ValueError("Lhotse data needs the lhotse package: pip install 'streamssl[lhotse]'") from None
    return lhotse


def cut_layout(src: str | Path) -> str | None:
    """``"lhotse"`` for a ``.jsonl.gz`` cut manifest, ``"shar"`` for a folder of Lhotse Shar shards, else None."""
    src = Path(src)
    if src.is_file() and src.name.endswith(CUTS_SUFFIX):
        return "lhotse"
    if src.is_dir() and (src / SHAR_CUTS.format(index="000000")).is_file():
        return "shar"
    return None


def shar_shards(src: str | Path) -> list[tuple[str, str]]:
    """``(cuts manifest, recording tar)`` of every shard of a Shar folder, in shard order.

    Raises:
        ValueError: a shard has no recording tar (this toolkit reads audio from ``recording`` fields).
    """
    src = Path(src)
    shards = []
    for cuts in sorted(src.glob(SHAR_CUTS.format(index="*"))):
        index = cuts.name.split(".")[1]
        recording = src / SHAR_RECORDING.format(index=index)
        if not recording.is_file():
            raise ValueError(f"{src}: Shar shard {cuts.name} has no {recording.name} (audio) beside it")
        shards.append((str(cuts), str(recording)))
    return shards


def open_cuts(src: str | Path, shards: Sequence[int] | None = None, audio: bool = True) -> Any:
    """A lazy ``CutSet`` of a cut manifest or a Shar folder.

    Args:
        shards: for a Shar folder, the indices of the shards to read, in that order (default: all).
        audio: for a Shar folder, read the recording tars too; without, the cuts carry metadata only
            (durations, supervisions) and cannot load audio, but nothing but the small manifests is read.
    """
    cut_set = require_lhotse().CutSet
    layout = cut_layout(src)
    if layout == "lhotse":
        if shards is not None:
            raise ValueError(f"{src} is one cut manifest, not shards")
        return cut_set.from_jsonl_lazy(src)
    if layout != "shar":
        raise ValueError(f"{src}: neither a Lhotse cut manifest ({CUTS_SUFFIX}) nor a Lhotse Shar folder")
    every = shar_shards(src)
    chosen = every if shards is None else [every[i] for i in shards]
    fields = {"cuts": [cuts for cuts, _ in chosen]}
    if audio:
        fields["recording"] = [recording for _, recording in chosen]
    return cut_set.from_shar(fields=fields)


@dataclass(frozen=True)
class CutUtterance(Utterance):
    """An utterance read from a Lhotse cut, which it keeps to load its audio. ``audio`` is the audio file
    for a cut of a whole mono file, else ``ORIGIN#CUT_ID`` (a shard or manifest and the cut in it)."""

    cut: Any = field(default=None, compare=False, repr=False)

    def read_audio(self, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """The cut's samples, float32 mono of shape (S,) at ``sample_rate`` Hz; ``ValueError`` naming the
        audio if Lhotse cannot load it."""
        samples = _load(self.cut, self.audio)
        mono = samples.mean(axis=0) if samples.shape[0] > 1 else samples[0]
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        return np.ascontiguousarray(resample(mono, self.cut.sampling_rate, sample_rate), dtype=np.float32)


def _load(cut: Any, where: str) -> np.ndarray:
    """``(channels, samples)`` of ``cut``, or a ``ValueError``: Lhotse reports a missing file, a corrupt
    one and a failed backend with different exception types."""
    from lhotse.audio.utils import AudioLoadingError

    try:
        return np.atleast_2d(cut.load_audio())
    except (AudioLoadingError, OSError, RuntimeError, ValueError, AssertionError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        # Lhotse lists every audio backend it tried, with the call's arguments; the first one's reason is
        # the file's problem.
        first = _FIRST_BACKEND_ERROR.search(message)
        message = first.group(1) if first else message[:300]
        raise ValueError(f"{where}: cannot decode audio: {message}") from None


def _whole_file(cut: Any) -> str | None:
    """The audio file of a cut that is a whole mono file, as :func:`streamssl.data.load_audio` reads it."""
    recording = cut.recording if cut.has_recording else None
    if recording is None or len(recording.sources) != 1 or recording.sources[0].type != "file":
        return None
    if recording.num_channels != 1 or cut.start != 0 or abs(cut.duration - recording.duration) > 1e-6:
        return None
    return str(Path(recording.sources[0].source).resolve())


def _origin(cut: Any, src: str | Path) -> str:
    custom = getattr(cut, "custom", None) or {}
    return str(custom.get("shard_origin", src))


def cut_utterance(cut: Any, src: str | Path, problems: list[Problem], check_files: bool = True
                  ) -> CutUtterance | None:
    """The utterance of ``cut`` (from ``src``), or None after appending its problems to ``problems``:
    no recording or a missing audio file (with ``check_files``), no duration, no transcript, a transcript
    that does not normalise. The audio itself is not decoded (see :func:`decode_problem`)."""
    where = f"{_origin(cut, src)}#{cut.id}"
    found = len(problems)
    if not cut.has_recording:
        problems.append(Problem(where, "missing-audio", f"cut {cut.id} has no recording"))
    elif check_files:
        missing = [s.source for s in cut.recording.sources if s.type == "file" and not Path(s.source).is_file()]
        if missing:
            problems.append(Problem(where, "missing-audio", f"cut {cut.id}: audio file {missing[0]} does not exist"))
    if not cut.duration > 0:
        problems.append(Problem(where, "zero-length", f"cut {cut.id} has duration {cut.duration}"))
    supervisions = sorted(cut.supervisions, key=lambda s: s.start)
    texts = [s.text for s in supervisions if s.text and s.text.strip()]
    text = None
    if not texts:
        problems.append(Problem(where, "missing-transcript", f"cut {cut.id} has no supervision with text"))
    else:
        text = check_transcript(" ".join(texts), where, problems)
    if len(problems) > found:
        return None
    speaker = next((s.speaker for s in supervisions if s.speaker), None) or "unknown"
    return CutUtterance(cut.id, _whole_file(cut) or where, float(cut.duration), text, speaker, cut)


def decode_problem(utt: CutUtterance) -> Problem | None:
    """Decode ``utt``'s audio in full; the problem if it fails, holds no samples or non-finite ones."""
    try:
        samples = _load(utt.cut, utt.audio)
    except ValueError as error:
        return Problem(utt.audio, "unreadable", str(error).removeprefix(f"{utt.audio}: "))
    if samples.size == 0:
        return Problem(utt.audio, "zero-length", f"cut {utt.id} decodes to no samples")
    if not np.isfinite(samples).all():
        return Problem(utt.audio, "unreadable", f"cut {utt.id} decodes to non-finite samples")
    return None


def checked_cuts(cuts: Iterable[Any], src: str | Path, decode: bool = False
                 ) -> Iterator[tuple[Any, CutUtterance | None, list[Problem]]]:
    """Every cut of ``cuts`` with its utterance (None if it has a problem) and its problems: those of
    :func:`cut_utterance`, a repeated id, and with ``decode`` those of :func:`decode_problem`."""
    seen: set[str] = set()
    for cut in cuts:
        problems: list[Problem] = []
        if cut.id in seen:
            problems.append(Problem(f"{_origin(cut, src)}#{cut.id}", "duplicate-id", f"cut {cut.id} appears twice"))
            yield cut, None, problems
            continue
        seen.add(cut.id)
        utt = cut_utterance(cut, src, problems)
        if utt is not None and decode:
            problem = decode_problem(utt)
            if problem is not None:
                problems.append(problem)
                utt = None
        yield cut, utt, problems


def scan_cuts(src: str | Path, decode: bool = False, progress: bool = False, keep_audio: bool = True
              ) -> tuple[list[CutUtterance], list[Problem], Counter]:
    """Check a cut manifest or Shar folder in full, as the other readers check their layouts: its good
    utterances (in file order), every problem, and how many cuts are at each sample rate.

    With ``decode`` every cut's audio is decoded. A Shar folder's utterances hold their (compressed)
    audio in memory, as read from its tars; without ``keep_audio`` (a check that only counts them) they
    hold metadata only, cannot load audio, and without ``decode`` the tars are not read at all.
    """
    cuts = open_cuts(src, audio=decode or keep_audio)
    utterances: list[CutUtterance] = []
    problems: list[Problem] = []
    rates: Counter = Counter()
    for cut, utt, found in tqdm(checked_cuts(cuts, src, decode), desc="checking cuts", unit="cut",
                                disable=None if progress else True):
        problems.extend(found)
        if cut.has_recording:
            rates[int(cut.sampling_rate)] += 1
        if utt is not None:
            utterances.append(utt if keep_audio else CutUtterance(utt.id, utt.audio, utt.duration, utt.text,
                                                                   utt.speaker, cut.drop_in_memory_data()))
    return utterances, problems, rates


def audio_file(utt: Utterance) -> str:
    """The audio file a JSONL manifest line can name for ``utt``; ``ValueError`` for a cut that is not a
    whole mono file (part of a recording, a shard's audio)."""
    if isinstance(utt, CutUtterance) and _whole_file(utt.cut) is None:
        raise ValueError(f"cut {utt.id} ({utt.audio}) is not a whole audio file, so a JSONL manifest cannot "
                         "name it; write --format lhotse, or shards")
    return utt.audio


def cut_of(utt: Utterance) -> Any:
    """``utt`` as a Lhotse cut: a cut utterance's own, else a whole-file cut (one channel, or every
    channel of a multi-channel file, which loading averages) with one supervision."""
    if isinstance(utt, CutUtterance):
        return utt.cut
    lhotse = require_lhotse()
    recording = lhotse.Recording.from_file(utt.audio, recording_id=utt.id)
    supervision = lhotse.SupervisionSegment(id=utt.id, recording_id=utt.id, start=0.0, duration=recording.duration,
                                            text=utt.text, speaker=utt.speaker)
    if recording.num_channels > 1:
        return lhotse.MultiCut(id=utt.id, start=0.0, duration=recording.duration, channel=recording.channel_ids,
                               recording=recording, supervisions=[supervision])
    return lhotse.MonoCut(id=utt.id, start=0.0, duration=recording.duration, channel=0, recording=recording,
                          supervisions=[supervision])


def write_cuts(utterances: Sequence[Utterance], path: str | Path) -> None:
    """Write ``utterances`` as a Lhotse cut manifest (``path`` must end in ``.jsonl.gz``), in the given order.

    Raises:
        ValueError: another suffix, or a cut whose audio lives in a Shar shard (a manifest names files).
    """
    if not str(path).endswith(CUTS_SUFFIX):
        raise ValueError(f"a Lhotse cut manifest is a {CUTS_SUFFIX} file, got {path}")
    cuts = [cut_of(utt) for utt in utterances]
    for cut in cuts:
        if cut.has_recording and any(source.type in ("memory", "shar") for source in cut.recording.sources):
            raise ValueError(f"cut {cut.id} keeps its audio in a Shar shard, which a cut manifest cannot name; "
                             "read the Shar folder itself")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    require_lhotse().CutSet.from_cuts(cuts).to_file(path)


def write_shar(utterances: Sequence[Utterance], out_dir: str | Path, shard_size: int = SHARD_SIZE,
               seed: int = 0) -> list[str]:
    """Write ``utterances`` as Lhotse Shar shards of ``shard_size`` cuts in ``out_dir``, their audio as
    FLAC (lossless for 16-bit sources), in an order shuffled by ``seed``: shards are read sequentially, so
    each one should be a random sample of the corpus. Returns the cut manifests written.

    Raises:
        ValueError: ``shard_size`` below 1, or ``out_dir`` already holds files.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    cut_set = require_lhotse().CutSet
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; shards go into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(utterances)
    random.Random(seed).shuffle(order)
    cuts = cut_set.from_cuts(cut_of(utt) for utt in order)
    written = cuts.to_shar(out_dir, fields={"recording": "flac"}, shard_size=shard_size)
    return list(written["cuts"])
