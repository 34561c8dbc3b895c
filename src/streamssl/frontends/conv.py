"""``conv``: the wav2vec 2.0-style waveform frontend (docs/methods.md section 1), streaming.

Every layer normalises each frame on its own (LayerNorm over channels), because a statistic taken
across time (GroupNorm, utterance mean/variance) would make a frame depend on the future.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from streamssl.frontends.base import FeatureAugment, FrameGeometry, Frontend, options_error, register_frontend
from streamssl.mixers.window import keep_last, push, take


@dataclass
class ConvOptions:
    """``channels`` per layer; ``kernels`` and ``strides`` in samples, one per layer. The defaults give
    20 ms frames from a 25 ms (400-sample) window at 16 kHz."""

    channels: int = 512
    kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)

    def __post_init__(self) -> None:
        self.kernels = tuple(int(k) for k in self.kernels)
        self.strides = tuple(int(s) for s in self.strides)
        if not isinstance(self.channels, int) or isinstance(self.channels, bool) or self.channels <= 0:
            raise options_error("conv", "channels", f"must be a positive integer, got {self.channels!r}")
        if len(self.kernels) != len(self.strides) or not self.kernels:
            raise options_error("conv", "kernels", "and strides must be non-empty and of equal length, "
                                f"got {self.kernels} and {self.strides}")
        if any(k <= 0 for k in self.kernels):
            raise options_error("conv", "kernels", f"must be positive, got {self.kernels}")
        if any(s <= 0 for s in self.strides):
            raise options_error("conv", "strides", f"must be positive, got {self.strides}")


class ConvLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, S)`` -> ``(B, C_out, S')``."""
        y = self.conv(x).transpose(1, 2)
        return nn.functional.gelu(self.norm(y)).transpose(1, 2)


@register_frontend
class ConvFrontend(Frontend):
    """16 kHz waveform ``(B, S)`` -> features ``(B, T, channels)``.

    With the default kernels (10,3,3,3,3,2,2) and strides (5,2,2,2,2,2,2) a frame is made every
    320 samples (20 ms) from a 400-sample (25 ms) window: frame ``t`` reads samples ``[320 t, 320 t + 400)``,
    so its look-ahead past its hop is 80 samples (5 ms). ``augment`` sees the output features
    ``(B, T, channels)``.
    """

    name = "conv"
    Options = ConvOptions
    legacy_keys = {"conv_channels": "channels", "conv_kernels": "kernels", "conv_strides": "strides"}
    tiny_options = {"channels": 16}

    def __init__(self, options: ConvOptions, sample_rate: int):
        super().__init__()
        channels, kernels, strides = options.channels, options.kernels, options.strides
        ins = [1] + [channels] * (len(kernels) - 1)
        self.layers = nn.ModuleList(ConvLayer(i, channels, k, s) for i, k, s in zip(ins, kernels, strides))
        self.kernels, self.strides = kernels, strides
        self.geometry = self.frame_geometry(options, sample_rate)
        self.feature_dim = channels
        self.input_dim = None

    @classmethod
    def frame_geometry(cls, options: ConvOptions, sample_rate: int) -> FrameGeometry:
        hop, field = 1, 1
        for k, s in zip(options.kernels, options.strides):
            field += (k - 1) * hop
            hop *= s
        return FrameGeometry(unit_ms=1000.0 / sample_rate, hop=hop, lookahead=field - hop,
                             receptive_field=field, min_input=field)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        for k, s in zip(self.kernels, self.strides):
            lengths = torch.where(lengths >= k, torch.div(lengths - k, s, rounding_mode="floor") + 1, 0)
        return lengths

    def forward(self, x: Tensor, lengths: Tensor | None = None,
                augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        h = x.unsqueeze(1)
        for layer in self.layers:
            h = layer(h)
        feats, frame_lengths = h.transpose(1, 2), self.output_lengths(lengths)
        if augment is not None:
            feats = augment(feats, frame_lengths)
        return feats, frame_lengths

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The latest ``receptive_field - 1`` samples ``(B, receptive_field - 1)``, zeros at the start."""
        return torch.zeros(batch_size, self.geometry.receptive_field - 1, device=device, dtype=dtype)

    def step_window(self, chunk: Tensor, counts: Tensor, samples_in: Tensor,
                    state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hop, field = self.geometry.hop, self.geometry.receptive_field
        n = chunk.shape[1]
        slots = (n + hop - 1) // hop  # not -(-n // hop): traced shape arithmetic divides toward zero
        window = push(state, chunk, counts)
        total = samples_in + counts
        made = self._frames_made(total)
        # The slots frames ending with the newest one; the older of them were made before (or do not exist).
        start = (made - slots) * hop - (total - window.shape[1])
        if slots:
            frames = self(take(window, start, (slots - 1) * hop + field))[0]
        else:
            frames = chunk.new_zeros(chunk.shape[0], 0, self.feature_dim)
        return frames, made - self._frames_made(samples_in), keep_last(window, field - 1)

    def _frames_made(self, samples: Tensor) -> Tensor:
        hop, field = self.geometry.hop, self.geometry.receptive_field
        return torch.where(samples >= field, torch.div(samples - field, hop, rounding_mode="floor") + 1, 0)
