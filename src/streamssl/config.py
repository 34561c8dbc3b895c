"""Encoder configuration: a plain dataclass that round-trips through dicts, YAML and JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamssl.frontends import FRONTENDS, FrameGeometry, frontend_class

DEFAULT_FRONTEND = "conv"


@dataclass
class EncoderConfig:
    """Everything needed to rebuild an :class:`~streamssl.Encoder`.

    Frontend (docs/methods.md section 1):
        frontend: a name in :data:`streamssl.frontends.FRONTENDS`: ``"conv"`` (16 kHz waveform through
            a wav2vec 2.0-style convolution stack, 20 ms frames), ``"fbank"`` (waveform -> 80-bin log-mel
            -> causal subsampling to 20 or 40 ms frames), ``"none"`` (frames ``(B, T, input_dim)`` in).
        frontend_options: options of the chosen frontend (validated by it), e.g. ``{"channels": 256}``
            for ``conv``, ``{"subsampling": 2}`` for ``fbank``, ``{"input_dim": 80}`` for ``none``.
            The fields ``conv_channels``, ``conv_kernels``, ``conv_strides``, ``input_dim`` and
            ``input_frame_ms`` of older configurations are read into them by :meth:`from_dict`.
        sample_rate: of the waveform, in Hz.

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

    frontend: str = DEFAULT_FRONTEND
    frontend_options: dict[str, Any] = field(default_factory=dict)
    sample_rate: int = 16000
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
        self.frontend_options = dict(self.frontend_options or {})
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

        for name in ("sample_rate", "d_model", "n_layers", "n_heads", "ffn_dim", "pos_conv_kernel",
                     "pos_conv_groups"):
            positive(name)
        frontend_class(self.frontend).parse_options(self.frontend_options, self.sample_rate)
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

    def frame_geometry(self) -> FrameGeometry:
        """Where the frontend's output frames sit on the input (hop, look-ahead, receptive field)."""
        cls = frontend_class(self.frontend)
        return cls.frame_geometry(cls.parse_options(self.frontend_options, self.sample_rate), self.sample_rate)

    @property
    def frame_ms(self) -> float:
        """Period of the encoder's frames, in milliseconds."""
        return self.frame_geometry().frame_ms

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
        """Build from plain values. Frontend fields of older configurations (``conv_channels``,
        ``conv_kernels``, ``conv_strides``, ``input_dim``, ``input_frame_ms``) become ``frontend_options``
        of the frontend that used them; those of another frontend had no effect and are dropped."""
        data = dict(data)
        legacy = {key for frontend in FRONTENDS.values() for key in frontend.legacy_keys}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - legacy)
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys: {unknown}; known keys: {sorted(known)}")
        mapping = frontend_class(data.get("frontend", DEFAULT_FRONTEND)).legacy_keys
        options = dict(data.get("frontend_options") or {})
        for key in sorted(legacy & set(data)):
            value = data.pop(key)
            if key not in mapping:
                continue
            option = mapping[key]
            if option in options and options[option] != value:
                raise ValueError(f"EncoderConfig.{key}={value!r} contradicts frontend_options.{option}="
                                 f"{options[option]!r}")
            options[option] = value
        data["frontend_options"] = options
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
        values: dict[str, Any] = dict(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, dropout=0.0,
                                      pos_conv_kernel=8, pos_conv_groups=4, left_frames=8, right_frames=2)
        values.update(overrides)
        # Overrides go through from_dict, so the older frontend fields (input_dim=...) work here too.
        frontend = frontend_class(values.get("frontend", DEFAULT_FRONTEND))
        named = {frontend.legacy_keys[key] for key in overrides if key in frontend.legacy_keys}
        defaults = {k: v for k, v in frontend.tiny_options.items() if k not in named}
        values["frontend_options"] = {**defaults, **dict(values.get("frontend_options") or {})}
        return cls.from_dict(values)
