"""Waveform frontend (METHODS.md section 1): a wav2vec 2.0-style convolution stack that streams.

Every layer normalises each frame on its own (LayerNorm over channels), because a statistic taken
across time (GroupNorm, utterance mean/variance) would make a frame depend on the future.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, S)`` -> ``(B, C_out, S')``."""
        y = self.conv(x).transpose(1, 2)
        return nn.functional.gelu(self.norm(y)).transpose(1, 2)


class ConvFrontend(nn.Module):
    """16 kHz waveform ``(B, S)`` -> features ``(B, T, conv_channels)``.

    With the default kernels (10,3,3,3,3,2,2) and strides (5,2,2,2,2,2,2) a frame is made every
    ``hop_samples`` = 320 samples (20 ms) from ``receptive_field_samples`` = 400 samples (25 ms):
    frame ``t`` reads samples ``[320 t, 320 t + 400)``.
    """

    def __init__(self, channels: int, kernels: tuple[int, ...], strides: tuple[int, ...]):
        super().__init__()
        ins = [1] + [channels] * (len(kernels) - 1)
        self.layers = nn.ModuleList(ConvLayer(i, channels, k, s) for i, k, s in zip(ins, kernels, strides))
        self.kernels, self.strides = kernels, strides
        hop, field = 1, 1
        for k, s in zip(kernels, strides):
            field += (k - 1) * hop
            hop *= s
        self.hop_samples, self.receptive_field_samples = hop, field

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames made from ``lengths`` samples: only frames whose whole window is inside the input."""
        for k, s in zip(self.kernels, self.strides):
            lengths = torch.where(lengths >= k, torch.div(lengths - k, s, rounding_mode="floor") + 1, 0)
        return lengths

    def forward(self, wave: Tensor) -> Tensor:
        x = wave.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """One buffer per layer of input not yet consumed, ``(B, C_in, n)``."""
        return [torch.zeros(batch_size, layer.conv.in_channels, 0, device=device, dtype=dtype)
                for layer in self.layers]

    def step(self, samples: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``(B, n)`` new samples -> ``(B, m, C)`` new frames; ``m`` may be zero."""
        x = samples.unsqueeze(1)
        new_state = []
        for layer, buffered, k, s in zip(self.layers, state, self.kernels, self.strides):
            x = torch.cat([buffered, x], dim=2)
            n_out = (x.shape[2] - k) // s + 1 if x.shape[2] >= k else 0
            new_state.append(x[:, :, n_out * s:])
            if n_out:
                x = layer(x[:, :, : (n_out - 1) * s + k])
            else:
                x = x.new_zeros(x.shape[0], layer.conv.out_channels, 0)
        return x.transpose(1, 2), new_state
