"""``fbank``: 80-bin log-mel filterbank features, a global mean/variance normalisation and a causal
convolutional subsampling to 20 ms or 40 ms frames (docs/methods.md section 1).

The filterbank is computed by kaldi-native-fbank (the extractor sherpa-onnx streams with): 25 ms
window, 10 ms hop, povey window, no dither, ``snip_edges`` (a frame exists only once its whole window
has arrived), so every log-mel frame is a function of its own window alone and streaming equals offline
exactly. Samples in ``[-1, 1]`` are scaled to the 16-bit range first, the scale Kaldi's energy floor
was chosen for. The filterbank is not differentiable and runs under ``no_grad`` on the CPU.

Two parts, so an exported model can take feature frames (``docs/streaming.md``):

* :meth:`FbankFrontend.extract` / :class:`OnlineLogMel`: waveform -> log-mel frames
  ``(B, T_mel, num_mel_bins)`` at 10 ms (knf; no parameters). :class:`OnlineLogMel` also runs beside
  an exported model, in the ONNX Runtime backend;
* :meth:`FbankFrontend.encode_features` / :meth:`FbankFrontend.encode_window`: log-mel frames ->
  features ``(B, T, channels)`` (a plain torch module: normalisation buffers and the subsampling convs;
  the streaming form is traceable, so it is part of the exported graph).

Normalisation uses one mean and standard deviation per mel bin, estimated from training data by
:meth:`FbankFrontend.fit_normalizer` and stored as buffers (so they travel in every checkpoint); no
statistic is ever taken over an utterance. The subsampling is ``log2(subsampling)`` convolutions of
stride 2 over time, each left-padded by ``kernel - 2`` frames: output frame ``t`` reads log-mel frames
up to the last one of its own hop, so the subsampling adds no look-ahead. The frontend's look-ahead is
the window's reach past its hop, ``window - hop`` = 15 ms.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable

import kaldi_native_fbank as knf
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.frontends.base import FeatureAugment, FrameGeometry, Frontend, options_error, register_frontend
from streamssl.mixers.window import keep_last, push, take
from streamssl.runtime.logmel import LogMel

SUBSAMPLINGS = (2, 4)


@dataclass
class FbankOptions:
    """Log-mel and subsampling settings.

    ``num_mel_bins`` triangular mel filters between ``low_freq_hz`` and ``high_freq_hz`` (``None``: the
    Nyquist frequency) on a ``window_ms`` window every ``hop_ms``; ``subsampling`` (2 or 4) log-mel
    frames per output frame (20 or 40 ms); ``channels`` of each subsampling convolution, ``kernel``
    its width in frames (at least the stride, 2).
    """

    num_mel_bins: int = 80
    window_ms: float = 25.0
    hop_ms: float = 10.0
    low_freq_hz: float = 20.0
    high_freq_hz: float | None = None
    subsampling: int = 4
    channels: int = 256
    kernel: int = 3

    def __post_init__(self) -> None:
        for name in ("num_mel_bins", "subsampling", "channels", "kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise options_error("fbank", name, f"must be a positive integer, got {value!r}")
        if not self.hop_ms > 0:
            raise options_error("fbank", "hop_ms", f"must be positive, got {self.hop_ms!r}")
        if not self.window_ms >= self.hop_ms:
            raise options_error("fbank", "window_ms", f"({self.window_ms}) must be at least hop_ms "
                                f"({self.hop_ms}): a shorter window would skip samples")
        if self.subsampling not in SUBSAMPLINGS:
            raise options_error("fbank", "subsampling", f"must be one of {SUBSAMPLINGS}, got {self.subsampling!r}")
        if self.kernel < 2:
            raise options_error("fbank", "kernel", f"must be at least 2 (the stride), got {self.kernel}")
        if self.low_freq_hz < 0:
            raise options_error("fbank", "low_freq_hz", f"must be non-negative, got {self.low_freq_hz}")
        if self.high_freq_hz is not None and not self.high_freq_hz > self.low_freq_hz:
            raise options_error("fbank", "high_freq_hz", f"({self.high_freq_hz}) must be above low_freq_hz "
                                f"({self.low_freq_hz})")

    def samples(self, ms: float, sample_rate: int) -> int:
        return round(ms * sample_rate / 1000)

    @property
    def n_layers(self) -> int:
        return int(math.log2(self.subsampling))


@functools.lru_cache(maxsize=16)
def _knf_options(num_mel_bins: int, window_ms: float, hop_ms: float, low_freq_hz: float,
                 high_freq_hz: float | None, sample_rate: int) -> knf.FbankOptions:
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.frame_length_ms = window_ms
    opts.frame_opts.frame_shift_ms = hop_ms
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = num_mel_bins
    opts.mel_opts.low_freq = low_freq_hz
    opts.mel_opts.high_freq = 0.0 if high_freq_hz is None else high_freq_hz
    return opts


def knf_options(options: FbankOptions, sample_rate: int) -> knf.FbankOptions:
    """The kaldi-native-fbank settings of ``options`` at ``sample_rate`` Hz."""
    return _knf_options(options.num_mel_bins, float(options.window_ms), float(options.hop_ms),
                        float(options.low_freq_hz),
                        None if options.high_freq_hz is None else float(options.high_freq_hz), sample_rate)


class GlobalNormalizer(nn.Module):
    """``(x - mean) / std`` per feature bin, with statistics from training data (buffers).

    ``frames`` counts the frames the statistics came from; 0 means not estimated yet (identity).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("frames", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, dim)`` -> ``(B, T, dim)``."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @torch.no_grad()
    def set_statistics(self, total: Tensor, total_sq: Tensor, frames: int) -> None:
        """From per-bin sums and sums of squares (float64) over ``frames`` frames."""
        if frames <= 0:
            raise ValueError("the statistics need at least one frame")
        mean = total / frames
        var = (total_sq / frames - mean ** 2).clamp(min=0.0)
        # A bin that never varies (a mel band above the signal's bandwidth) must not divide by zero.
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(var.sqrt().clamp(min=1e-3).to(self.std.dtype))
        self.frames.fill_(frames)


class CausalSubsampling(nn.Module):
    """Stride-2 convolutions over time, left-padded by ``kernel - 2`` frames, each followed by GELU.

    ``(B, T, in_dim)`` -> ``(B, T // 2**n_layers, channels)``; output frame ``t`` reads input frames
    up to ``2**n_layers * (t + 1) - 1``, the last one of its own hop.
    """

    def __init__(self, in_dim: int, channels: int, kernel: int, n_layers: int):
        super().__init__()
        ins = [in_dim] + [channels] * (n_layers - 1)
        self.convs = nn.ModuleList(nn.Conv1d(i, channels, kernel, stride=2) for i in ins)
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = F.gelu(conv(F.pad(h, (self.kernel - 2, 0))))
        return h.transpose(1, 2)

    def step_window(self, x: Tensor, count: Tensor, context: list[Tensor],
                    context_count: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """Streaming :meth:`forward` with fixed shapes (traceable).

        Args:
            x: ``(B, n, in_dim)`` input frames, row ``b``'s last ``count[b]`` real (right-aligned).
            count: ``(B,)`` int64.
            context: per layer its unconsumed input ``(B, C_in, kernel - 1)``, right-aligned, of which
                ``context_count[b]`` (between ``kernel - 2`` and ``kernel - 1``) are real; at the start the
                ``kernel - 2`` frames of zero left padding.
        Returns:
            ``(B, ceil(n / 2**n_layers), channels)`` with row ``b``'s last ``new[b]`` frames new, ``new``,
            and the next ``context`` and ``context_count``.
        """
        h = x.transpose(1, 2)
        new_context, new_count = [], []
        for conv, cache, cached in zip(self.convs, context, context_count):
            slots = (h.shape[2] + 1) // 2
            window = push(cache, h, count, dim=2)
            total = cached + count
            made = torch.where(total >= self.kernel, torch.div(total - self.kernel, 2, rounding_mode="floor") + 1, 0)
            # The slots outputs ending with the newest one read the window from here on; the older of
            # them are filler and may read clamped slots.
            start = window.shape[2] - total + 2 * (made - slots)
            if slots:
                h = F.gelu(conv(take(window, start, 2 * (slots - 1) + self.kernel, dim=2)))
            else:
                h = h.new_zeros(h.shape[0], conv.out_channels, 0)
            new_context.append(keep_last(window, self.kernel - 1, dim=2))
            new_count.append(total - 2 * made)
            count = made
        return h.transpose(1, 2), count, new_context, new_count


class OnlineLogMel:
    """kaldi-native-fbank log-mel frames of a batch of streams, for the PyTorch step: torch tensors around
    the numpy :class:`~streamssl.runtime.logmel.LogMel` (which the torch-free runtime runs beside an
    exported graph). The samples not yet framed wait in a fixed-shape, right-aligned buffer
    ``(B, window_samples - 1)``; a step equals :meth:`frames` of the whole stream exactly.
    """

    def __init__(self, options: FbankOptions, sample_rate: int):
        self.options, self.sample_rate = options, sample_rate
        self.knf = knf_options(options, sample_rate)
        self.numpy = LogMel(self.knf)
        self.window_samples = self.numpy.window_samples
        self.hop_samples = self.numpy.hop_samples

    def frames(self, pcm: np.ndarray) -> np.ndarray:
        """Samples ``(S,)`` float32 in ``[-1, 1]`` -> log-mel ``(T_mel, num_mel_bins)`` float32."""
        return self.numpy.frames(pcm)

    def slots(self, n: int) -> int:
        """Log-mel frame slots of a step of ``n`` samples: the most frames ``n`` new samples can complete."""
        return self.numpy.slots(n)

    @torch.no_grad()
    def step(self, chunk: Tensor, counts: Tensor, pending: Tensor,
             pending_count: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step of every stream (:meth:`LogMel.step <streamssl.runtime.logmel.LogMel.step>`).

        Args:
            chunk: ``(B, n)`` samples, row ``b``'s last ``counts[b]`` real.
            counts: ``(B,)`` int64.
            pending: ``(B, window_samples - 1)``, row ``b``'s last ``pending_count[b]`` the samples not yet
                framed.
            pending_count: ``(B,)`` int64.
        Returns:
            log-mel ``(B, slots(n), num_mel_bins)`` in ``chunk``'s dtype, row ``b``'s last ``new[b]`` frames
            new; ``new`` ``(B,)``; the next ``pending`` and ``pending_count``.
        """
        mel, new, rest, rest_count = self.numpy.step(
            chunk.detach().to("cpu", torch.float32).numpy(), counts.cpu().numpy(),
            pending.detach().to("cpu", torch.float32).numpy(), pending_count.cpu().numpy())
        device, dtype = chunk.device, chunk.dtype
        return (torch.from_numpy(mel).to(device, dtype), torch.from_numpy(new).to(device),
                torch.from_numpy(rest).to(device, dtype), torch.from_numpy(rest_count).to(device))


@register_frontend
class FbankFrontend(Frontend):
    """Waveform ``(B, S)`` -> log-mel -> global normalisation -> causal subsampling ``(B, T, channels)``.

    ``augment`` (training) sees the normalised log-mel frames ``(B, T_mel, num_mel_bins)``, 10 ms apart.
    """

    name = "fbank"
    Options = FbankOptions
    tiny_options = {"channels": 16}
    # The subsampling convolutions are half the frontend's job; frozen after pretraining they cost the
    # low-resource recipe's pretrained encoders 2-3 points of CER (docs/results.md).
    frozen_when_fine_tuned = False

    def __init__(self, options: FbankOptions, sample_rate: int):
        super().__init__()
        self.options, self.sample_rate = options, sample_rate
        self.window_samples = options.samples(options.window_ms, sample_rate)
        self.hop_samples = options.samples(options.hop_ms, sample_rate)
        self.log_mel = OnlineLogMel(options, sample_rate)
        self.normalizer = GlobalNormalizer(options.num_mel_bins)
        self.subsampling = CausalSubsampling(options.num_mel_bins, options.channels, options.kernel,
                                             options.n_layers)
        self.geometry = self.frame_geometry(options, sample_rate)
        self.feature_dim = options.channels
        self.input_dim = None

    @classmethod
    def check_sample_rate(cls, options: FbankOptions, sample_rate: int) -> None:
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
            raise ValueError(f"EncoderConfig.sample_rate must be a positive integer, got {sample_rate!r}")
        for name in ("window_ms", "hop_ms"):
            exact = getattr(options, name) * sample_rate / 1000
            if abs(exact - round(exact)) > 1e-6:
                raise ValueError(f"EncoderConfig.sample_rate {sample_rate} Hz: the fbank frontend's {name} "
                                 f"({getattr(options, name)}) is {exact:g} samples, not a whole number")
        try:
            knf.OnlineFbank(knf_options(options, sample_rate))
        except Exception as error:  # knf reports impossible mel banks as ValueError or RuntimeError
            raise ValueError(f"EncoderConfig.sample_rate {sample_rate} Hz cannot take the fbank frontend's "
                             f"num_mel_bins={options.num_mel_bins}, low_freq_hz={options.low_freq_hz}, "
                             f"high_freq_hz={options.high_freq_hz}: {error}") from None

    @classmethod
    def frame_geometry(cls, options: FbankOptions, sample_rate: int) -> FrameGeometry:
        window, hop = options.samples(options.window_ms, sample_rate), options.samples(options.hop_ms, sample_rate)
        field_frames, stride = 1, 1
        for _ in range(options.n_layers):
            field_frames += (options.kernel - 1) * stride
            stride *= 2
        return FrameGeometry(unit_ms=1000.0 / sample_rate, hop=hop * options.subsampling,
                             lookahead=window - hop, receptive_field=window + (field_frames - 1) * hop,
                             min_input=window + (options.subsampling - 1) * hop)

    # ---------------------------------------------------------------- log-mel (knf, no parameters)
    def mel_lengths(self, lengths: Tensor) -> Tensor:
        """Log-mel frames in ``lengths`` samples (``snip_edges``: whole windows only)."""
        return torch.where(lengths >= self.window_samples,
                           torch.div(lengths - self.window_samples, self.hop_samples, rounding_mode="floor") + 1, 0)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return torch.div(self.mel_lengths(lengths), self.options.subsampling, rounding_mode="floor")

    @torch.no_grad()
    def extract(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Waveform ``(B, S)``, valid samples ``(B,)`` -> log-mel ``(B, T_mel, num_mel_bins)`` (zeros past
        each row's frames) and log-mel frames per row ``(B,)``. In ``x``'s dtype and device."""
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        mel_lengths = self.mel_lengths(lengths)
        out = torch.zeros(x.shape[0], int(mel_lengths.max()) if x.shape[0] else 0, self.options.num_mel_bins,
                          dtype=x.dtype)
        for b, length in enumerate(lengths.tolist()):
            frames = self.log_mel.frames(x[b, :length].detach().to("cpu", torch.float32).numpy())
            out[b, : frames.shape[0]] = torch.from_numpy(frames).to(x.dtype)
        return out.to(x.device), mel_lengths

    # ---------------------------------------------------------------- learned part (plain torch)
    def encode_features(self, mel: Tensor, mel_lengths: Tensor,
                        augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        """Log-mel ``(B, T_mel, num_mel_bins)`` -> features ``(B, T_mel // subsampling, channels)`` and
        their lengths ``(B,)``."""
        normalized = self.normalizer(mel)
        if augment is not None:
            normalized = augment(normalized, mel_lengths)
        lengths = torch.div(mel_lengths, self.options.subsampling, rounding_mode="floor")
        return self.subsampling(normalized), lengths

    def encode_window(self, mel: Tensor, mel_counts: Tensor,
                      state: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Streaming :meth:`encode_features` with fixed shapes (traceable; the part of a step an export
        keeps in its graph).

        ``mel`` ``(B, m, num_mel_bins)``, row ``b``'s last ``mel_counts[b]`` frames new; ``state`` holds
        ``context`` and ``context_count`` (see :meth:`init_state`). Returns ``(B, ceil(m / subsampling),
        channels)`` with row ``b``'s last ``new[b]`` frames new, ``new``, and the next ``context`` state.
        """
        frames, new, context, count = self.subsampling.step_window(self.normalizer(mel), mel_counts,
                                                                   state["context"], state["context_count"])
        return frames, new, {"context": context, "context_count": count}

    # ---------------------------------------------------------------- the frontend protocol
    def forward(self, x: Tensor, lengths: Tensor | None = None,
                augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        mel, mel_lengths = self.extract(x, lengths)
        return self.encode_features(mel, mel_lengths, augment)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Right-aligned, with counts: ``samples`` ``(B, window_samples - 1)`` the samples not yet framed
        (``samples_count`` ``(B,)`` of them real); ``context``, per subsampling convolution, its
        unconsumed input ``(B, C_in, kernel - 1)`` (``context_count`` ``(B,)`` real, between
        ``kernel - 2`` and ``kernel - 1``; it starts as the ``kernel - 2`` frames of zero left padding)."""
        kernel = self.options.kernel
        return {"samples": torch.zeros(batch_size, self.window_samples - 1, device=device, dtype=dtype),
                "samples_count": torch.zeros(batch_size, dtype=torch.long, device=device),
                "context": [torch.zeros(batch_size, conv.in_channels, kernel - 1, device=device, dtype=dtype)
                            for conv in self.subsampling.convs],
                "context_count": [torch.full((batch_size,), kernel - 2, dtype=torch.long, device=device)
                                  for _ in self.subsampling.convs]}

    def step_window(self, chunk: Tensor, counts: Tensor, samples_in: Tensor,
                    state: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Log-mel by knf (:class:`OnlineLogMel`, once per stream; not traceable), then
        :meth:`encode_window` for the whole batch."""
        mel, mel_counts, samples, samples_count = self.log_mel.step(chunk, counts, state["samples"],
                                                                    state["samples_count"])
        frames, new, context = self.encode_window(mel, mel_counts, state)
        return frames, new, {"samples": samples, "samples_count": samples_count, **context}

    def input_feature_layout(self) -> tuple[int, int]:
        """The normalised log-mel frames, ``subsampling`` per output frame."""
        return self.options.subsampling, self.options.num_mel_bins

    # ---------------------------------------------------------------- global statistics
    def needs_statistics(self) -> bool:
        return int(self.normalizer.frames) == 0

    def fit_normalizer(self, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
        """Per-bin mean and standard deviation of the log-mel frames of ``(waveform (B, S), lengths (B,))``
        batches; replaces the current statistics. Returns the number of frames used."""
        dim = self.options.num_mel_bins
        total = torch.zeros(dim, dtype=torch.float64)
        total_sq = torch.zeros(dim, dtype=torch.float64)
        frames = 0
        for x, lengths in batches:
            mel, mel_lengths = self.extract(x.to("cpu", torch.float32), lengths.to("cpu"))
            valid = torch.arange(mel.shape[1])[None, :] < mel_lengths[:, None]
            rows = mel[valid].to(torch.float64)
            total += rows.sum(0)
            total_sq += rows.pow(2).sum(0)
            frames += rows.shape[0]
        self.normalizer.set_statistics(total.to(self.normalizer.mean.device), total_sq.to(self.normalizer.mean.device),
                                       frames)
        return frames
