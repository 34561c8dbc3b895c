"""The streaming speech encoder: frontend, causal positional convolution, a mixer stack, final LayerNorm.

Offline (training)::

    y, y_lengths = encoder(x, lengths)        # x (B, S) waveform, or (B, T, input_dim) frames (frontend "none")

Streaming (the same function, chunk by chunk, for a batch of streams)::

    state = encoder.init_state(batch_size)
    y_i, state = encoder.step(chunk_i, state)  # any chunk length, even one sample
    y_end, state = encoder.flush(state)
    torch.cat([y_0, ..., y_end], dim=1)        # == y, up to float rounding

The state is a pytree of tensors of fixed size with per-stream positions, so streams at different
points share a batch (``Encoder.stack_states``, ``EncoderState.select``), and :meth:`Encoder.step_window`
is a function of tensors only, with shapes that depend on nothing but the chunk length (traceable
with the conv and none frontends; fbank runs kaldi-native-fbank per stream in Python, so an fbank
export traces the step from the log-mel frames on: ``FbankFrontend.encode_window`` then
:meth:`Encoder.advance_features`).

The end of a stream is one mechanism, eager and exported alike: ``step_window(..., flush=mask)``
feeds padding frames to the streams of ``mask`` (ignoring their input) until their look-ahead is
out; :meth:`Encoder.flush_window` is one such call, wide enough for every stream to finish.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import GetAttrKey, register_pytree_node, tree_flatten, tree_unflatten

from streamssl.config import EncoderConfig
from streamssl.frontends import FeatureAugment, Frontend, build_frontend
from streamssl.latency import Latency
from streamssl.mixers import build_stack
from streamssl.mixers.window import Chunk, keep_last, push, size, take, tracing


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

    def step(self, x: Tensor, count: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``(B, n, D)`` new frame slots (the last ``count`` real); ``history`` ``(B, kernel-1, D)``
        the frames before them, zeros at the start (what the offline form pads with).

        Eager, the convolution runs as one batched matrix product per group over the unfolded window: on
        a few frames oneDNN's convolution costs several times as much. An exported step keeps the
        convolution, one ONNX node that ONNX Runtime runs fast (and ``unfold`` does not export here)."""
        if x.shape[1] == 0:
            return x, history
        window = push(history, x, count)
        if _tracing():
            conv = self.conv(window.transpose(1, 2)).transpose(1, 2)
        else:
            n, d_model = size(x, 1), size(x, 2)
            groups, kernel = self.conv.groups, self.kernel
            cols = window.unfold(1, kernel, 1)                                # (B, n, D, kernel)
            cols = cols.reshape(-1, groups, d_model // groups * kernel).transpose(0, 1)
            weight = self.conv.weight.view(groups, d_model // groups, -1)     # (G, D/G out, D/G in * kernel)
            conv = torch.matmul(cols, weight.transpose(1, 2)).transpose(0, 1).reshape(-1, n, d_model) + self.conv.bias
        y = x + F.gelu(conv)
        return y, keep_last(window, self.kernel - 1)


@dataclass
class EncoderState:
    """Everything one :class:`Encoder` needs to continue a batch of streams (a pytree of tensors).

    Every tensor is batch-first and, for a finite ``left_frames``, of a size fixed at ``init_state``.
    ``owner`` (the encoder that made it) and ``finished`` are static context, not tensors.

    frontend: the frontend's fixed-shape state (``Frontend.init_state``; ``None`` for ``none``).
    positional: ``(B, pos_conv_kernel - 1, d_model)`` the causal positional convolution's history.
    stack: the mixer family's state.
    samples_in: ``(B,)`` samples (or input frames) fed; frames_in: ``(B,)`` frames that entered the
    stack; frames_end: the same plus flush padding; frames_out: ``(B,)`` output frames emitted.
    ``finished``: :meth:`Encoder.flush_window` ended every stream (a per-stream flush leaves it false).
    """

    owner: str
    frontend: Any
    positional: Tensor
    stack: Any
    samples_in: Tensor
    frames_in: Tensor
    frames_end: Tensor
    frames_out: Tensor
    finished: bool = False

    @property
    def batch_size(self) -> int:
        return self.samples_in.shape[0]

    @property
    def frames_waiting(self) -> Tensor:
        """``(B,)`` frames in the stack not emitted yet (waiting for look-ahead); a flushing stream is
        done when its count reaches 0."""
        return self.frames_in - self.frames_out

    def select(self, indices: Sequence[int] | Tensor) -> "EncoderState":
        """The streams ``indices`` (in that order) as a new batch."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.samples_in.device)
        leaves, spec = tree_flatten(self)
        return tree_unflatten([leaf.index_select(0, index) for leaf in leaves], spec)


_TENSOR_FIELDS = ("frontend", "positional", "stack", "samples_in", "frames_in", "frames_end", "frames_out")


def _flatten_state(state: EncoderState) -> tuple[list[Any], Any]:
    present = tuple(name for name in _TENSOR_FIELDS if getattr(state, name) is not None)
    return [getattr(state, name) for name in present], (state.owner, state.finished, present)


def _flatten_state_with_keys(state: EncoderState) -> tuple[list[tuple[GetAttrKey, Any]], Any]:
    values, context = _flatten_state(state)
    return [(GetAttrKey(name), value) for name, value in zip(context[2], values)], context


def _unflatten_state(values: Any, context: Any) -> EncoderState:
    owner, finished, present = context
    fields = dict.fromkeys(_TENSOR_FIELDS)
    fields.update(zip(present, values))
    return EncoderState(owner, **fields, finished=finished)


register_pytree_node(EncoderState, _flatten_state, _unflatten_state,
                     serialized_type_name="streamssl.encoder.EncoderState",
                     flatten_with_keys_fn=_flatten_state_with_keys)


def _tracing() -> bool:
    """Whether a graph is being traced: it cannot branch on values, so the exported model's runtime
    checks its input instead."""
    return tracing()


def _stack_leaves(leaves: list[Tensor]) -> Tensor:
    """Concatenate batch-first tensors; caches that grew to different widths (unlimited left context)
    are padded at their old end, where slots hold positions before every stream's start."""
    shape = [max(leaf.shape[d] for leaf in leaves) for d in range(leaves[0].dim())]
    padded = []
    for leaf in leaves:
        pad: list[int] = []
        for d in reversed(range(1, leaf.dim())):
            pad += [shape[d] - leaf.shape[d], 0]
        padded.append(F.pad(leaf, pad) if any(pad) else leaf)
    return torch.cat(padded, dim=0)


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
        if not _tracing() and not torch.isfinite(x).all():
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
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        def counter() -> Tensor:
            return torch.zeros(batch_size, dtype=torch.long, device=device)

        return EncoderState(
            owner=self._owner,
            frontend=self.frontend.init_state(batch_size, device, dtype),
            positional=torch.zeros(batch_size, self.config.pos_conv_kernel - 1, self.config.d_model,
                                   device=device, dtype=dtype),
            stack=self.stack.init_state(batch_size, device, dtype),
            samples_in=counter(), frames_in=counter(), frames_end=counter(), frames_out=counter(),
        )

    @staticmethod
    def stack_states(states: Sequence[EncoderState]) -> EncoderState:
        """One batch of the streams of ``states`` (each any batch size, at any position), in order."""
        if not states:
            raise ValueError("stack_states needs at least one state")
        specs = set()
        columns = []
        for state in states:
            if not isinstance(state, EncoderState):
                raise ValueError(f"stack_states takes EncoderState objects, got {type(state).__name__}")
            leaves, spec = tree_flatten(state)
            specs.add(str(spec))
            columns.append(leaves)
        if len(specs) != 1:
            raise ValueError("states come from different encoders or stream configurations and cannot be stacked")
        _, spec = tree_flatten(states[0])
        return tree_unflatten([_stack_leaves(list(leaves)) for leaves in zip(*columns)], spec)

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
        Streams at different positions may emit different numbers of frames: row ``b`` then holds
        ``state.frames_out[b]`` minus its previous value real frames, the rest is filler. Use
        :meth:`step_window` to get those counts without reading them into Python.
        """
        y, counts, state = self.step_window(chunk, state)
        return y[:, :int(counts.max())], state

    def step_window(self, chunk: Tensor, state: EncoderState, counts: Tensor | None = None,
                    flush: Tensor | None = None) -> tuple[Tensor, Tensor, EncoderState]:
        """:meth:`step` as a function of tensors only (what the exporter traces).

        Args:
            chunk: ``(B, n)`` samples or ``(B, n, input_dim)`` frames.
            counts: ``(B,)`` how many of the ``n`` are real per stream, right-aligned (the first
                ``n - counts[b]`` are filler); ``None``: all of them.
            flush: ``(B,)`` bool, true for the streams whose call is padding past their end: their row
                of ``chunk`` and their count are ignored, and ``ceil(n / hop)`` zero frames drive out
                their look-ahead (a stream is done when ``state.frames_waiting`` is 0); ``None``: none.
        Returns:
            ``(B, m, d_model)`` with each stream's new frames first, ``(B,)`` how many, and the new state.
            ``m`` depends only on ``n``.
        """
        self._check_state(state)
        self._check_input(chunk, "chunk")
        batch = state.batch_size
        if chunk.shape[0] != batch:
            raise ValueError(f"chunk has batch size {chunk.shape[0]} but the state holds {batch} streams")
        if counts is None:
            counts = torch.full_like(state.samples_in, chunk.shape[1])
        flush = self._check_flush(flush, batch, state)
        counts = torch.where(flush, 0, counts)
        if not _tracing():
            fed = (counts > 0) & (state.frames_end > state.frames_in)
            if fed.any():
                raise ValueError(f"stream {int(fed.nonzero()[0, 0])} was flushed and cannot take more input; "
                                 "start it again with init_state")
        feats, frame_counts, frontend = self.frontend.step_window(chunk, counts, state.samples_in, state.frontend)
        return self.advance_features(feats, frame_counts, frontend, counts, state, flush)

    @staticmethod
    def _check_flush(flush: Tensor | None, batch: int, state: EncoderState) -> Tensor:
        if flush is None:
            return torch.zeros_like(state.samples_in, dtype=torch.bool)
        if not isinstance(flush, Tensor) or flush.dtype != torch.bool or tuple(flush.shape) != (batch,):
            got = (f"dtype {flush.dtype}, shape {tuple(flush.shape)}" if isinstance(flush, Tensor)
                   else type(flush).__name__)
            raise ValueError(f"flush must be a bool tensor of shape ({batch},), got {got}")
        return flush

    def flush(self, state: EncoderState) -> tuple[Tensor, EncoderState]:
        """End every stream: emit the frames still waiting for look-ahead. The state cannot be used again."""
        y, counts, state = self.flush_window(state)
        return y[:, :int(counts.max())], state

    def flush_window(self, state: EncoderState) -> tuple[Tensor, Tensor, EncoderState]:
        """:meth:`flush` as a function of tensors only, with :meth:`step_window`'s outputs: one
        :meth:`step_window` call that flushes every stream, ``lookahead_frames()`` frames wide."""
        self._check_state(state)
        input_dim = self.frontend.input_dim
        width = self.stack.lookahead_frames() * self.frontend.geometry.hop
        shape = (state.batch_size, width) if input_dim is None else (state.batch_size, width, input_dim)
        padding = torch.zeros(shape, dtype=self.dtype, device=state.samples_in.device)
        flush = torch.ones_like(state.samples_in, dtype=torch.bool)
        y, emitted, state = self.step_window(padding, state, torch.zeros_like(state.samples_in), flush)
        return y, emitted, replace(state, finished=True)

    def advance_features(self, feats: Tensor, frame_counts: Tensor, frontend_state: Any, input_counts: Tensor,
                         state: EncoderState, flush: Tensor | None = None) -> tuple[Tensor, Tensor, EncoderState]:
        """The step after the frontend (the second half of :meth:`step_window`), for an exporter whose
        graph starts past part of the frontend.

        Args:
            feats: ``(B, S, feature_dim)`` frontend frames, row ``b``'s last ``frame_counts[b]`` new.
            frame_counts: ``(B,)`` int64.
            frontend_state: the frontend's state after making them.
            input_counts: ``(B,)`` input units (samples) the step brought, added to ``samples_in``.
            state: the state before the step.
            flush: ``(B,)`` bool, streams past their end: their ``feats`` become ``S`` padding frames that
                drive out the look-ahead, and their ``input_counts`` are not counted; ``None``: none.
        Returns:
            :meth:`step_window`'s outputs.
        """
        if flush is None:
            flush = torch.zeros_like(state.samples_in, dtype=torch.bool)
        feats = torch.where(flush.view(-1, 1, 1), 0.0, feats)
        frame_counts = torch.where(flush, size(feats, 1), frame_counts)
        real = torch.where(flush, 0, frame_counts)
        chunk = Chunk(frame_counts, state.frames_end + frame_counts, state.frames_in + real)
        h, positional = self.positional.step(self.project(feats), frame_counts, state.positional)
        y, valid, stack_state = self.stack.step(h, chunk, state.stack)
        emitted = valid.sum(dim=1)
        if size(y, 1):
            leading = (valid.long().cumsum(dim=1) == 0).sum(dim=1)   # filler slots before the first real one
            y = take(y, leading, size(y, 1))
        y = self.final_norm(y)
        samples_in = state.samples_in + torch.where(flush, 0, input_counts)
        new_state = EncoderState(state.owner, frontend_state, positional, stack_state, samples_in, chunk.valid_end,
                                 chunk.end, state.frames_out + emitted, state.finished)
        return y, emitted, new_state

    # ---------------------------------------------------------------- latency
    def latency(self) -> Latency:
        """Declared algorithmic look-ahead (docs/methods.md section 5.1), frontend and encoder parts apart."""
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
