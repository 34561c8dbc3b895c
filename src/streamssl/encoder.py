"""The streaming speech encoder: frontend, causal positional convolution, a mixer stack, final LayerNorm.

Offline (training)::

    y, y_lengths = encoder(x, lengths)        # x (B, S) waveform, or (B, T, input_dim) frames (frontend "none")

Streaming (the same function, chunk by chunk, for a batch of streams)::

    state = encoder.init_state(batch_size)
    y_i, state = encoder.step(chunk_i, state)  # any chunk length, even one sample
    y_end, state = encoder.flush(state)
    torch.cat([y_0, ..., y_end], dim=1)        # == y, up to float rounding
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import EncoderConfig
from streamssl.frontends import FeatureAugment, Frontend, build_frontend
from streamssl.latency import Latency
from streamssl.mixers import build_stack


class CausalPositionalConv(nn.Module):
    """``x + GELU(conv(x))`` with a left-padded grouped convolution: positional information with no
    look-ahead (wav2vec 2.0's centred kernel of 128 frames would read 1.28 s into the future)."""

    def __init__(self, d_model: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=groups)
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        padded = F.pad(x.transpose(1, 2), (self.kernel - 1, 0))
        return x + F.gelu(self.conv(padded)).transpose(1, 2)

    def step(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """``history`` holds the last ``kernel - 1`` frames ``(B, D, kernel-1)``, zeros at the start."""
        if x.shape[1] == 0:
            return x, history
        window = torch.cat([history, x.transpose(1, 2)], dim=2)
        y = x + F.gelu(self.conv(window)).transpose(1, 2)
        return y, window[:, :, window.shape[2] - (self.kernel - 1):]


@dataclass
class EncoderState:
    """Everything one :class:`Encoder` needs to continue a batch of streams.

    ``owner`` ties the state to the encoder that made it; ``frontend`` is the frontend's own state (see
    docs/streaming.md); ``samples_in``/``frames_out`` count input units (samples, or frames with
    ``frontend="none"``) fed and output frames emitted per stream.
    """

    owner: str
    batch_size: int
    frontend: Any
    positional: Tensor
    stack: Any
    samples_in: int = 0
    frames_in: int = 0
    frames_out: int = 0
    finished: bool = False


class Encoder(nn.Module):
    """A streaming transformer speech encoder built from an :class:`EncoderConfig`."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.frontend: Frontend = build_frontend(config.frontend, config.frontend_options, config.sample_rate)
        self.feature_dim = self.frontend.feature_dim
        self.feature_norm = nn.LayerNorm(self.feature_dim)
        self.feature_proj = nn.Linear(self.feature_dim, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.positional = CausalPositionalConv(config.d_model, config.pos_conv_kernel, config.pos_conv_groups)
        self.stack = build_stack(config)
        self.final_norm = nn.LayerNorm(config.d_model)
        self._owner = uuid.uuid4().hex

    @property
    def dtype(self) -> torch.dtype:
        return self.feature_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.feature_proj.weight.device

    # ---------------------------------------------------------------- input checks
    def _check_input(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        input_dim = self.frontend.input_dim
        if input_dim is None:
            if x.dim() != 2:
                raise ValueError(f"{what} must be a waveform of shape (batch, samples), got shape {tuple(x.shape)}")
        elif x.dim() != 3 or x.shape[2] != input_dim:
            raise ValueError(f"{what} must be frames of shape (batch, frames, {input_dim}), "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be floating point ({self.dtype}), got dtype {x.dtype}; "
                             "convert integer PCM with x.float() / 32768")
        if x.dtype != self.dtype:
            raise ValueError(f"{what} has dtype {x.dtype} but the encoder's weights are {self.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or infinite values")

    def _check_lengths(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        batch, total = x.shape[0], x.shape[1]
        unit = self._unit
        if lengths is None:
            return torch.full((batch,), total, dtype=torch.long, device=x.device)
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
            shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be a 1-D tensor of {batch} {unit} counts, got {shape}")
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if (lengths <= 0).any():
            raise ValueError(f"lengths must be positive, got {lengths.tolist()}")
        if (lengths > total).any():
            worst = int(lengths.argmax())
            raise ValueError(f"lengths[{worst}]={int(lengths[worst])} exceeds the input's {total} {unit}")
        return lengths.to(device=x.device, dtype=torch.long)

    @property
    def _unit(self) -> str:
        return "samples" if self.frontend.input_dim is None else "frames"

    # ---------------------------------------------------------------- offline
    def features(self, x: Tensor, lengths: Tensor | None = None,
                 augment: FeatureAugment | None = None) -> tuple[Tensor, Tensor]:
        """Frontend features before projection: ``(B, T, feature_dim)`` and frame counts ``(B,)``.

        The wav2vec 2.0 objective quantises these; :meth:`project` and :meth:`encode_frames` finish the job.
        ``augment`` (training only) is handed to the frontend, which applies it to its spectral features.
        """
        self._check_input(x, "input")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"input is empty (shape {tuple(x.shape)})")
        lengths = self._check_lengths(x, lengths)
        if (self.frontend.output_lengths(lengths) == 0).any():
            short = int(lengths.min())
            raise ValueError(f"input of {short} {self._unit} is shorter than one frame "
                             f"({self.frontend.geometry.min_input} {self._unit})")
        return self.frontend(x, lengths, augment)

    def project(self, features: Tensor) -> Tensor:
        """``(B, T, feature_dim)`` -> ``(B, T, d_model)``."""
        return self.dropout(self.feature_proj(self.feature_norm(features)))

    def encode_frames(self, h: Tensor, lengths: Tensor) -> Tensor:
        """Projected frames ``(B, T, d_model)`` -> encoder output ``(B, T, d_model)``."""
        return self.final_norm(self.stack(self.positional(h), lengths))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Offline encoding.

        Args:
            x: waveform ``(B, S)`` at ``sample_rate``, or frames ``(B, T, input_dim)`` (frontend ``none``).
            lengths: ``(B,)`` valid samples (or frames) per utterance; ``None``: all of ``x``.
        Returns:
            ``(B, T, d_model)`` outputs and ``(B,)`` valid output frames. Outputs past an utterance's
            length are padding; a valid output never depends on padding.
        """
        feats, frame_lengths = self.features(x, lengths)
        return self.encode_frames(self.project(feats), frame_lengths), frame_lengths

    # ---------------------------------------------------------------- streaming
    def init_state(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> EncoderState:
        """A fresh state for ``batch_size`` streams. Raises ``ValueError`` if the mixer cannot stream."""
        error = self.stack.stream_error()
        if error is not None:
            raise ValueError(error)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        d_model = self.config.d_model
        return EncoderState(
            owner=self._owner,
            batch_size=batch_size,
            frontend=self.frontend.init_state(batch_size, device, dtype),
            positional=torch.zeros(batch_size, d_model, self.config.pos_conv_kernel - 1, device=device, dtype=dtype),
            stack=self.stack.init_state(batch_size, device, dtype),
        )

    def _check_state(self, state: EncoderState) -> None:
        if not isinstance(state, EncoderState):
            raise ValueError(f"state must be an EncoderState from init_state, got {type(state).__name__}")
        if state.owner != self._owner:
            raise ValueError("state was created by another Encoder; call init_state on this encoder")
        if state.finished:
            raise ValueError("stream already flushed; call init_state to start a new one")

    def step(self, chunk: Tensor, state: EncoderState) -> tuple[Tensor, EncoderState]:
        """Feed ``chunk`` ``(B, n)`` samples (or ``(B, n, input_dim)`` frames with frontend ``none``) to every stream.

        Returns the output frames ``(B, m, d_model)`` that became final (``m`` may be 0) and the new state.
        """
        self._check_state(state)
        self._check_input(chunk, "chunk")
        if chunk.shape[0] != state.batch_size:
            raise ValueError(f"chunk has batch size {chunk.shape[0]} but the state holds {state.batch_size} streams")
        feats, frontend_state = self.frontend.step(chunk, state.frontend)
        return self._advance(feats, state, frontend_state, chunk.shape[1], final=False)

    def flush(self, state: EncoderState) -> tuple[Tensor, EncoderState]:
        """End every stream: emit the frames still waiting for look-ahead. The state cannot be used again."""
        self._check_state(state)
        feats, frontend_state = self.frontend.flush(state.frontend, state.batch_size, state.positional.device,
                                                    state.positional.dtype)
        return self._advance(feats, state, frontend_state, 0, final=True)

    def _advance(self, feats: Tensor, state: EncoderState, frontend_state: Any, n_in: int,
                 final: bool) -> tuple[Tensor, EncoderState]:
        h, positional = self.positional.step(self.project(feats), state.positional)
        y, stack_state = self.stack.step(h, state.stack, final)
        y = self.final_norm(y)
        new_state = EncoderState(state.owner, state.batch_size, frontend_state, positional, stack_state,
                                 state.samples_in + n_in, state.frames_in + feats.shape[1],
                                 state.frames_out + y.shape[1], final)
        return y, new_state

    # ---------------------------------------------------------------- latency
    def latency(self) -> Latency:
        """Declared algorithmic look-ahead (METHODS.md section 5.1), frontend and encoder parts apart."""
        cfg, geometry = self.config, self.frontend.geometry
        return Latency(mixer=cfg.mixer, n_layers=cfg.n_layers, frame_ms=geometry.frame_ms,
                       frontend_lookahead_ms=geometry.lookahead_ms,
                       frontend_receptive_field_ms=geometry.receptive_field_ms,
                       encoder_lookahead_frames=self.stack.lookahead_frames(),
                       encoder_mean_lookahead_frames=self.stack.mean_lookahead_frames(),
                       streamable=self.stack.stream_error() is None)


def declared_latency(config: EncoderConfig) -> Latency:
    """The declared latency of ``config`` without allocating weights (the encoder is built on the meta device)."""
    with torch.device("meta"):
        return Encoder(config).latency()
