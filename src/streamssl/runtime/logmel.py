"""kaldi-native-fbank log-mel frames in numpy, offline and streamed: the host-side half of the ``fbank``
frontend, shared by the PyTorch step (:class:`streamssl.frontends.fbank.OnlineLogMel` wraps it) and the
torch-free runtime beside an exported graph.

The settings travel as a plain dict (:func:`knf_settings`, read back from knf itself), which an export
stores in its metadata and :func:`knf_options_from` turns back into knf options, so the runtime frames
exactly as the model was trained.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import kaldi_native_fbank as knf
import numpy as np

# Samples in [-1, 1] times this are on the 16-bit scale Kaldi's features (and energy floor) assume.
PCM_SCALE = 32768.0

_FRAME_FIELDS = ("samp_freq", "frame_length_ms", "frame_shift_ms", "dither", "preemph_coeff", "remove_dc_offset",
                 "window_type", "round_to_power_of_two", "snip_edges")
_MEL_FIELDS = ("num_bins", "low_freq", "high_freq")
_FBANK_FIELDS = ("use_energy", "use_log_fbank", "use_power")


def knf_settings(options: knf.FbankOptions) -> dict[str, Any]:
    """The knf options that decide a log-mel frame, as a JSON-able dict (see :func:`knf_options_from`)."""
    frame, mel = options.frame_opts, options.mel_opts
    return {**{name: getattr(frame, name) for name in _FRAME_FIELDS},
            **{name: getattr(mel, name) for name in _MEL_FIELDS},
            **{name: getattr(options, name) for name in _FBANK_FIELDS}}


def knf_options_from(settings: Mapping[str, Any]) -> knf.FbankOptions:
    """knf options from :func:`knf_settings`' dict; ``ValueError`` naming a missing or unknown setting."""
    expected = set(_FRAME_FIELDS + _MEL_FIELDS + _FBANK_FIELDS)
    missing, unknown = sorted(expected - set(settings)), sorted(set(settings) - expected)
    if missing or unknown:
        raise ValueError(f"log-mel settings: missing {missing}, unknown {unknown}")
    options = knf.FbankOptions()
    for target, names in ((options.frame_opts, _FRAME_FIELDS), (options.mel_opts, _MEL_FIELDS),
                          (options, _FBANK_FIELDS)):
        for name in names:
            setattr(target, name, settings[name])
    return options


class LogMel:
    """Log-mel frames ``(T_mel, num_bins)`` float32 of samples in ``[-1, 1]``, by kaldi-native-fbank.

    :meth:`step` frames a batch of streams whose samples not yet framed wait in a fixed-shape,
    right-aligned buffer ``(B, window_samples - 1)`` (part of the model state, so streams stack). With
    no dither and ``snip_edges`` a frame depends on its own window alone, so a step equals
    :meth:`frames` of the whole stream exactly.

    Building a knf extractor costs about 30 of its frames (its mel banks), so :meth:`step` keeps one
    and feeds it every stream's samples in turn: each stream's samples start at a multiple of the hop
    of the extractor's timeline (the previous ones are padded to one), and the frames that straddle two
    streams' samples are dropped. The kept extractor is a cache: a lock guards it (a model's frontend
    may step in several threads), and copies and pickles leave it behind.
    """

    def __init__(self, options: knf.FbankOptions, pcm_scale: float = PCM_SCALE):
        if options.frame_opts.dither != 0 or not options.frame_opts.snip_edges:
            raise ValueError("streamed log-mel frames need dither 0 and snip_edges, so that a frame depends on "
                             "its own window alone")
        self.options = options
        self.pcm_scale = np.float32(pcm_scale)
        frame = options.frame_opts
        self.sample_rate = int(frame.samp_freq)
        self.window_samples = round(frame.frame_length_ms * frame.samp_freq / 1000)
        self.hop_samples = round(frame.frame_shift_ms * frame.samp_freq / 1000)
        self.num_bins = options.mel_opts.num_bins
        self._reset_extractor()

    def _reset_extractor(self) -> None:
        self._extractor: knf.OnlineFbank | None = None
        self._fed = 0
        self._popped = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_extractor", "_fed", "_popped", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_extractor()

    def frames(self, pcm: np.ndarray) -> np.ndarray:
        """Samples ``(S,)`` float32 in ``[-1, 1]`` -> log-mel ``(T_mel, num_bins)`` float32."""
        extractor = knf.OnlineFbank(self.options)
        extractor.accept_waveform(self.sample_rate, np.asarray(pcm, dtype=np.float32) * self.pcm_scale)
        n = extractor.num_frames_ready
        if n == 0:
            return np.zeros((0, self.num_bins), dtype=np.float32)
        return np.stack([extractor.get_frame(i) for i in range(n)])

    def slots(self, n: int) -> int:
        """Log-mel frame slots of a step of ``n`` samples: the most frames ``n`` new samples can complete."""
        return (n + self.hop_samples - 1) // self.hop_samples

    def step(self, chunk: np.ndarray, counts: np.ndarray, pending: np.ndarray,
             pending_count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One step of every stream.

        Args:
            chunk: ``(B, n)`` float32 samples, row ``b``'s last ``counts[b]`` real.
            counts: ``(B,)`` int64.
            pending: ``(B, window_samples - 1)`` float32, row ``b``'s last ``pending_count[b]`` the samples
                not yet framed.
            pending_count: ``(B,)`` int64.
        Returns:
            log-mel ``(B, slots(n), num_bins)`` float32, row ``b``'s last ``new[b]`` frames new; ``new``
            ``(B,)`` int64; the next ``pending`` and ``pending_count``.
        """
        batch, n = chunk.shape
        width = pending.shape[1]
        window, hop = self.window_samples, self.hop_samples
        slots = self.slots(n)
        mel = np.zeros((batch, slots, self.num_bins), dtype=np.float32)
        new = np.zeros(batch, dtype=np.int64)
        rest = np.zeros((batch, width), dtype=np.float32)
        rest_count = np.zeros(batch, dtype=np.int64)
        for b, (count, waiting) in enumerate(zip(counts.tolist(), pending_count.tolist())):
            samples = np.concatenate([pending[b, width - waiting:], chunk[b, n - count:]])
            made = (samples.size - window) // hop + 1 if samples.size >= window else 0
            if made:
                mel[b, slots - made:] = self._frames_of(samples[:(made - 1) * hop + window], made)
            left = samples[made * hop:]
            rest[b, width - left.size:] = left
            new[b], rest_count[b] = made, left.size
        return mel, new, rest, rest_count

    def _frames_of(self, segment: np.ndarray, made: int) -> np.ndarray:
        """The ``made`` frames of ``segment`` (which holds exactly their windows), by the kept extractor."""
        with self._lock:
            return self._frames_locked(segment, made)

    def _frames_locked(self, segment: np.ndarray, made: int) -> np.ndarray:
        if self._extractor is None:
            self._extractor = knf.OnlineFbank(self.options)
        extractor = self._extractor
        first = self._fed // self.hop_samples
        pad = -segment.size % self.hop_samples
        scaled = np.zeros(segment.size + pad, dtype=np.float32)
        np.multiply(segment, self.pcm_scale, out=scaled[:segment.size])
        extractor.accept_waveform(self.sample_rate, scaled)
        self._fed += scaled.size
        frames = np.stack([extractor.get_frame(first + i) for i in range(made)])
        ready = extractor.num_frames_ready
        extractor.pop(ready - self._popped)
        self._popped = ready
        return frames
