"""``none``: the input already is frames ``(B, T, input_dim)`` (precomputed features, or the frames of
another model); they pass through unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamssl.frontends.base import FeatureAugment, FrameGeometry, Frontend, options_error, register_frontend


@dataclass
class FramesOptions:
    """``input_dim``: width of the frames; ``frame_ms``: their period."""

    input_dim: int = 80
    frame_ms: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.input_dim, int) or isinstance(self.input_dim, bool) or self.input_dim <= 0:
            raise options_error("none", "input_dim", f"must be a positive integer, got {self.input_dim!r}")
        if not self.frame_ms > 0:
            raise options_error("none", "frame_ms", f"must be positive, got {self.frame_ms!r}")


@register_frontend
class FramesFrontend(Frontend):
    """Frames in, the same frames out: no look-ahead, one frame per input frame. ``augment`` sees the
    input frames."""

    name = "none"
    Options = FramesOptions
    legacy_keys = {"input_dim": "input_dim", "input_frame_ms": "frame_ms"}

    def __init__(self, options: FramesOptions, sample_rate: int):
        super().__init__()
        self.geometry = self.frame_geometry(options, sample_rate)
        self.feature_dim = self.input_dim = options.input_dim

    @classmethod
    def frame_geometry(cls, options: FramesOptions, sample_rate: int) -> FrameGeometry:
        return FrameGeometry(unit_ms=float(options.frame_ms), hop=1, lookahead=0, receptive_field=1, min_input=1)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return lengths

    def forward(self, x: Tensor, lengths: Tensor | None = None,
                augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        return (x if augment is None else augment(x, lengths)), lengths

    def input_feature_layout(self) -> tuple[int, int]:
        """The input frames themselves, one per output frame."""
        return 1, self.input_dim

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to remember: a frame is ready as soon as it arrives."""
        return None

    def step_window(self, chunk: Tensor, counts: Tensor, samples_in: Tensor,
                    state: None) -> tuple[Tensor, Tensor, None]:
        return chunk, counts, None
