"""The frontend contract and the registry.

A *frontend* turns the encoder's input (a waveform ``(B, S)``, or frames ``(B, T, input_dim)``) into
feature frames ``(B, T', feature_dim)``, offline and in streaming, with the same result::

    feats, frame_lengths = frontend(x, lengths)        # offline
    state = frontend.init_state(batch_size, device, dtype)
    frames_i, new_i, state = frontend.step_window(chunk_i, counts_i, samples_in_i, state)
    # row b: its last new_i[b] frames are new; concatenated over steps == feats (valid frames)

The streaming state has a fixed shape per batch size (pending input and convolution context are kept
right-aligned with per-stream counts as tensors), so streams at different positions share a batch.
A frontend makes only frames whose input is complete, so the end of a stream holds no frames back.

Where a frame sits on the input is declared once, in :class:`FrameGeometry`, and the encoder, the
latency declaration, the look-ahead probe and the recogniser read it from there; none of them knows a
frontend by name. Each frontend owns an options dataclass (``EncoderConfig.frontend_options``) that
raises ``ValueError`` naming the impossible option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, nn

# A training-time transform of a frontend's spectral features: ``(feats (B, T, F), lengths (B,)) -> feats``.
FeatureAugment = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FrameGeometry:
    """How output frames sit on the input, in input units (samples, or input frames for ``none``).

    Output frame ``t`` owns the hop ``[t * hop, (t + 1) * hop)`` and reads the ``receptive_field``
    units that end ``lookahead`` units after its hop: ``[(t + 1) * hop + lookahead - receptive_field,
    (t + 1) * hop + lookahead)`` (units before the start of the input are zeros or absent).
    ``min_input`` units give the first frame.
    """

    unit_ms: float
    hop: int
    lookahead: int
    receptive_field: int
    min_input: int

    @property
    def frame_ms(self) -> float:
        return self.hop * self.unit_ms

    @property
    def lookahead_ms(self) -> float:
        return self.lookahead * self.unit_ms

    @property
    def receptive_field_ms(self) -> float:
        return self.receptive_field * self.unit_ms

    def frame_end(self, t: int) -> int:
        """Input units needed before frame ``t`` (0-based) can be made."""
        return (t + 1) * self.hop + self.lookahead


def options_error(frontend: str, option: str, message: str) -> ValueError:
    return ValueError(f"{frontend} frontend: EncoderConfig.frontend_options.{option} {message}")


class Frontend(nn.Module):
    """Base class of the registered frontends; see the module docstring for the protocol.

    Class attributes of a subclass: ``name``; ``Options`` (a dataclass whose ``__post_init__`` raises
    ``ValueError`` on impossible values); ``legacy_keys``, old ``EncoderConfig`` field names that map
    onto option names (so configurations saved before ``frontend_options`` existed still load);
    ``tiny_options``, the options of :meth:`streamssl.EncoderConfig.tiny`.

    Instance attributes: ``geometry`` (:class:`FrameGeometry`), ``feature_dim`` (output width) and
    ``input_dim`` (``None``: a waveform ``(B, S)`` at ``sample_rate``; an int: frames ``(B, T, input_dim)``).
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    legacy_keys: ClassVar[dict[str, str]] = {}
    tiny_options: ClassVar[dict[str, Any]] = {}
    # Whether fine-tuning from a pretrained checkpoint keeps this frontend fixed unless told otherwise
    # (``FinetuneConfig.freeze_frontend: null``): wav2vec 2.0 freezes its waveform convolutions.
    frozen_when_fine_tuned: ClassVar[bool] = True

    geometry: FrameGeometry
    feature_dim: int
    input_dim: int | None

    @classmethod
    def parse_options(cls, options: dict[str, Any], sample_rate: int) -> Any:
        """The validated options dataclass; ``ValueError`` names an unknown or impossible option."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig.frontend_options for {cls.name!r}: {unknown}; "
                             f"known: {sorted(known)}")
        parsed = cls.Options(**options)
        cls.check_sample_rate(parsed, sample_rate)
        return parsed

    @classmethod
    def check_sample_rate(cls, options: Any, sample_rate: int) -> None:
        """Raise ``ValueError`` if this frontend cannot take audio at ``sample_rate`` Hz."""

    @classmethod
    def frame_geometry(cls, options: Any, sample_rate: int) -> FrameGeometry:
        raise NotImplementedError

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Output frames made from ``lengths`` input units ``(B,)``: only frames whose input is complete."""
        raise NotImplementedError

    def forward(self, x: Tensor, lengths: Tensor | None = None,
                augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        """Offline: input ``x`` and valid units ``lengths`` ``(B,)`` -> ``(B, T', feature_dim)`` and ``(B,)``.

        ``augment`` (training only) transforms the frontend's spectral features where the frontend
        has them (log-mel bins, convolution channels, input frames; see each frontend).
        """
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        """A fresh streaming state: batch-first tensors (in dicts and lists, or ``None``) whose shapes
        depend on ``batch_size`` only."""
        raise NotImplementedError

    def step_window(self, chunk: Tensor, counts: Tensor, samples_in: Tensor,
                    state: Any) -> tuple[Tensor, Tensor, Any]:
        """One streaming step of every stream.

        Args:
            chunk: ``(B, n)`` samples or ``(B, n, input_dim)`` frames; row ``b``'s last ``counts[b]``
                are real, the ones before are filler.
            counts: ``(B,)`` real input units per stream.
            samples_in: ``(B,)`` input units each stream was fed before this chunk.
            state: from :meth:`init_state` or the previous step.
        Returns:
            ``(B, S, feature_dim)`` frames with ``S = ceil(n / geometry.hop)`` (a function of ``n``
            only), row ``b``'s last ``new[b]`` of them new and the ones before filler; ``new`` ``(B,)``;
            the new state.
        """
        raise NotImplementedError

    def input_feature_layout(self) -> tuple[int, int] | None:
        """``(frames per output frame, width)`` of the features ``augment`` sees when they are fixed
        input features, before any learned layer (BEST-RQ's targets and mask positions); ``None`` when
        ``augment`` sees learned features. Output frame ``t`` owns input-feature frames
        ``[t * frames, (t + 1) * frames)``."""
        return None

    # ---------------------------------------------------------------- global statistics
    def needs_statistics(self) -> bool:
        """Whether :meth:`fit_normalizer` must run before training (global feature statistics)."""
        return False

    def fit_normalizer(self, batches: Iterable[tuple[Tensor, Tensor]]) -> int:
        """Estimate global statistics from ``(x, lengths)`` training batches; returns the frames used.
        Frontends without statistics use none."""
        return 0


FRONTENDS: dict[str, type[Frontend]] = {}


def register_frontend(cls: type[Frontend]) -> type[Frontend]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if cls.name in FRONTENDS:
        raise ValueError(f"frontend {cls.name!r} is already registered")
    FRONTENDS[cls.name] = cls
    return cls


def frontend_class(name: str) -> type[Frontend]:
    if name not in FRONTENDS:
        raise ValueError(f"EncoderConfig.frontend must be one of {sorted(FRONTENDS)}, got {name!r}")
    return FRONTENDS[name]


def build_frontend(name: str, options: dict[str, Any], sample_rate: int) -> Frontend:
    cls = frontend_class(name)
    return cls(cls.parse_options(options, sample_rate), sample_rate)
