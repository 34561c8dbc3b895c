"""Encoder configuration: a plain dataclass that round-trips through dicts, YAML and JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FRONTENDS = ("conv", "none")


@dataclass
class EncoderConfig:
    """Everything needed to rebuild an :class:`~streamssl.Encoder`.

    Frontend (METHODS.md section 1):
        frontend: ``"conv"`` takes 16 kHz waveform ``(B, S)`` and makes frames with a wav2vec 2.0-style
            convolution stack; ``"none"`` takes frames ``(B, T, input_dim)`` directly.
        conv_channels, conv_kernels, conv_strides: the convolution stack. The defaults give 20 ms
            frames with a 25 ms (400-sample) receptive field.
        input_dim, input_frame_ms: width and period of the frames when ``frontend="none"``.

    Transformer body:
        d_model, n_layers, n_heads, ffn_dim, dropout: pre-LayerNorm blocks (mixer + feed-forward).
        pos_conv_kernel, pos_conv_groups: a causal (left-padded) grouped convolution that adds
            positional information without look-ahead.
        mixer: a name in :data:`streamssl.mixers.MIXERS`.
        left_frames: keys a frame may see in the past (``None``: unlimited).
        right_frames: look-ahead per layer in frames; one int for every layer or one per layer.
        block_frames: query block size of the blockwise (SA, LLSA) forms; ``None`` picks one.
        mixer_options: options of the chosen mixer family (validated by that family).
    """

    frontend: str = "conv"
    sample_rate: int = 16000
    conv_channels: int = 512
    conv_kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    input_dim: int = 80
    input_frame_ms: float = 20.0
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    mixer: str = "sa"
    left_frames: int | None = 64
    right_frames: int | tuple[int, ...] = 8
    block_frames: int | None = None
    mixer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conv_kernels = tuple(int(k) for k in self.conv_kernels)
        self.conv_strides = tuple(int(s) for s in self.conv_strides)
        if not isinstance(self.right_frames, int):
            self.right_frames = tuple(int(r) for r in self.right_frames)
        self.mixer_options = dict(self.mixer_options or {})
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible value."""
        from streamssl.mixers import MIXERS

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")

        if self.frontend not in FRONTENDS:
            raise ValueError(f"EncoderConfig.frontend must be one of {FRONTENDS}, got {self.frontend!r}")
        for name in ("sample_rate", "conv_channels", "input_dim", "d_model", "n_layers", "n_heads",
                     "ffn_dim", "pos_conv_kernel", "pos_conv_groups"):
            positive(name)
        if len(self.conv_kernels) != len(self.conv_strides) or not self.conv_kernels:
            raise ValueError("EncoderConfig.conv_kernels and conv_strides must be non-empty and of equal length, "
                             f"got {self.conv_kernels} and {self.conv_strides}")
        if any(k <= 0 for k in self.conv_kernels) or any(s <= 0 for s in self.conv_strides):
            raise ValueError("EncoderConfig.conv_kernels and conv_strides must be positive")
        if self.input_frame_ms <= 0:
            raise ValueError(f"EncoderConfig.input_frame_ms must be positive, got {self.input_frame_ms}")
        if self.d_model % self.n_heads:
            raise ValueError(f"EncoderConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_model % self.pos_conv_groups:
            raise ValueError(f"EncoderConfig.d_model ({self.d_model}) must be divisible by "
                             f"pos_conv_groups ({self.pos_conv_groups})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.left_frames is not None and (not isinstance(self.left_frames, int) or self.left_frames < 0):
            raise ValueError(f"EncoderConfig.left_frames must be a non-negative integer or None, got {self.left_frames!r}")
        rights = self.right_frames_per_layer()
        if len(rights) != self.n_layers:
            raise ValueError(f"EncoderConfig.right_frames has {len(rights)} entries but n_layers is {self.n_layers}")
        if any(r < 0 for r in rights):
            raise ValueError(f"EncoderConfig.right_frames must be non-negative, got {self.right_frames}")
        if self.block_frames is not None and self.block_frames <= 0:
            raise ValueError(f"EncoderConfig.block_frames must be positive or None, got {self.block_frames}")
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; registered mixers: {sorted(MIXERS)}")
        MIXERS[self.mixer].parse_options(self.mixer_options)

    def right_frames_per_layer(self) -> tuple[int, ...]:
        if isinstance(self.right_frames, int):
            return (self.right_frames,) * self.n_layers
        return tuple(self.right_frames)

    @property
    def hop_samples(self) -> int:
        """Input samples per output frame of the conv frontend."""
        hop = 1
        for s in self.conv_strides:
            hop *= s
        return hop

    @property
    def frame_ms(self) -> float:
        if self.frontend == "conv":
            return 1000.0 * self.hop_samples / self.sample_rate
        return self.input_frame_ms

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars only (tuples become lists at any depth), ready for YAML/JSON."""

        def plain(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "EncoderConfig":
        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of EncoderConfig fields, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def base(cls, **overrides: Any) -> "EncoderConfig":
        """wav2vec 2.0 BASE size: 12 layers, d_model 768, 12 heads, 20 ms frames."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "EncoderConfig":
        """A few-thousand-parameter encoder for tests and CPU demos."""
        values: dict[str, Any] = dict(conv_channels=16, d_model=32, n_layers=2, n_heads=4, ffn_dim=64,
                                      dropout=0.0, pos_conv_kernel=8, pos_conv_groups=4,
                                      left_frames=8, right_frames=2)
        values.update(overrides)
        return cls(**values)
