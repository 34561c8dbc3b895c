"""The mixer contract, the registry, and the pre-LayerNorm block shared by every family.

A *mixer family* is registered by name and builds a :class:`MixerStack`: the whole stack of
transformer blocks of an encoder, because some methods (LLSA, augmented memory) couple the layers.
Families whose layers are independent build a :class:`LayerStack` of :class:`Block` s around a
per-layer :class:`LayerMixer`.

Streaming protocol, shared by stacks, blocks and layer mixers (:mod:`streamssl.mixers.window`)::

    state = m.init_state(batch_size, device, dtype)       # a pytree dataclass of fixed-size tensors
    y, valid, state = stack.step(x_new, chunk, state)     # x_new (B, n, D) -> y (B, m, D), valid (B, m)
    out, state = layer_mixer.step(u_new, chunk, state)    # (B, n, D) -> (B, n, D), ``lag`` frames later

``x_new`` holds ``n`` frame slots per stream, the last ``chunk.count[b]`` of them real; ``valid`` marks
the slots of ``y`` that became final, in time order (a contiguous run per stream). Their
concatenation over steps equals the offline ``forward``. Positions and counts are per-stream tensors,
so streams at different positions share a batch; ``m`` depends only on ``n``. The end of a stream is
driven out by padding frames (``Encoder.flush``) with ``chunk.valid_end`` frozen at the stream's length.
A per-layer mixer has a fixed lag: its output slot ``o`` is at position ``chunk.end - lag - n + o``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from streamssl.mixers.window import Chunk, keep_last, output_mask, size, streaming_state


class MixerStack(nn.Module):
    """A stack of blocks mapping frames ``(B, T, D)`` to frames ``(B, T, D)``.

    A family that runs its training form block by block through :meth:`run_block` sets
    ``supports_checkpointing``; :func:`checkpoint_blocks` then turns on activation checkpointing.
    """

    supports_checkpointing = False
    checkpointing = False

    def run_block(self, block: Callable[..., Any], *inputs: Any) -> Any:
        """``block(*inputs)``; with ``checkpointing`` (and gradients on) its activations are not kept but
        recomputed in backward (``torch.utils.checkpoint``, which replays dropout's random draws)."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Offline form. ``x`` (B, T, D); ``lengths`` (B,) valid frames. Returns (B, T, D)."""
        raise NotImplementedError

    def lookahead_frames(self) -> int | None:
        """Future input frames an output frame may depend on (worst case); ``None``: the whole input."""
        raise NotImplementedError

    def mean_lookahead_frames(self) -> float | None:
        """Average over frames of the look-ahead; equals the worst case unless a family says otherwise."""
        return self.lookahead_frames()

    def stream_error(self) -> str | None:
        """Why this configuration cannot stream, or ``None`` if it can."""
        return None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        """A fresh streaming state: a pytree dataclass whose tensors have fixed sizes (unless the left
        context is unlimited, where caches grow with the stream)."""
        raise NotImplementedError

    def step(self, x: Tensor, chunk: Chunk, state: Any) -> tuple[Tensor, Tensor, Any]:
        """``x`` ``(B, n, D)`` new frame slots -> outputs ``(B, m, D)``, their validity ``(B, m)``, new state."""
        raise NotImplementedError


class LayerMixer(nn.Module):
    """The token mixer of one block: sees LayerNorm-ed frames, returns the residual branch."""

    def forward(self, u: Tensor, lengths: Tensor) -> Tensor:
        raise NotImplementedError

    def lookahead_frames(self) -> int | None:
        raise NotImplementedError

    def stream_error(self) -> str | None:
        return None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def step(self, u: Tensor, chunk: Chunk, state: Any) -> tuple[Tensor, Any]:
        """``u`` ``(B, n, D)`` LayerNorm-ed new frame slots -> ``(B, n, D)`` outputs ``lookahead_frames()`` later."""
        raise NotImplementedError


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + mixer(LN(x))`` then ``x + FFN(LN(x))``.

    In streaming, a mixer with look-ahead emits its outputs ``lag`` frames after their inputs arrive,
    so the block holds the residuals of the last ``lag`` frames.
    """

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, mixer: LayerMixer):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def residual_feed_forward(self, x: Tensor, mixed: Tensor) -> Tensor:
        """Residual add of a mixer output, then the feed-forward half of the block."""
        x = x + self.dropout(mixed)
        return x + self.dropout(self.ffn(self.norm2(x)))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        return self.residual_feed_forward(x, self.mixer(self.norm1(x), lengths))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> "BlockState":
        d_model = self.norm1.normalized_shape[0]
        lag = self.mixer.lookahead_frames()
        return BlockState(torch.zeros(batch_size, lag, d_model, device=device, dtype=dtype),
                          self.mixer.init_state(batch_size, device, dtype))

    def step(self, x: Tensor, chunk: Chunk, state: "BlockState") -> tuple[Tensor, "BlockState"]:
        """``x`` ``(B, n, D)`` -> ``(B, n, D)``, ``lag`` frames later (see the module docstring)."""
        n = size(x, 1)
        residual = chunk.push(state.residual, x)
        mixed, mixer_state = self.mixer.step(self.norm1(x), chunk, state.mixer)
        y = self.residual_feed_forward(residual[:, :n], mixed)
        return y, BlockState(keep_last(residual, size(state.residual, 1)), mixer_state)


@streaming_state
class BlockState:
    """residual: ``(B, lag, D)`` inputs of the frames whose mixer output is still pending; mixer: its state."""

    residual: Tensor
    mixer: Any


@streaming_state
class LayerStackState:
    blocks: list[BlockState]


class LayerStack(MixerStack):
    """Independent blocks in sequence; look-ahead adds up over layers."""

    supports_checkpointing = True

    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        for block in self.blocks:
            x = self.run_block(block, x, lengths)
        return x

    def lookahead_frames(self) -> int | None:
        total = 0
        for block in self.blocks:
            frames = block.mixer.lookahead_frames()
            if frames is None:
                return None
            total += frames
        return total

    def stream_error(self) -> str | None:
        for block in self.blocks:
            error = block.mixer.stream_error()
            if error is not None:
                return error
        return None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LayerStackState:
        return LayerStackState([b.init_state(batch_size, device, dtype) for b in self.blocks])

    def step(self, x: Tensor, chunk: Chunk, state: LayerStackState) -> tuple[Tensor, Tensor, LayerStackState]:
        new_states = []
        for block, block_state in zip(self.blocks, state.blocks):
            x, block_state = block.step(x, chunk, block_state)
            chunk = chunk.lagged(block.mixer.lookahead_frames())
            new_states.append(block_state)
        return x, output_mask(chunk, size(x, 1)), LayerStackState(new_states)


@dataclass
class MixerFamily:
    """A registry entry: how to parse a family's options and build its stack."""

    name: str
    build: Callable[[Any], MixerStack]
    options: type | None = None

    def parse_options(self, options: dict[str, Any]) -> Any:
        if self.options is None:
            if options:
                raise ValueError(f"mixer {self.name!r} takes no mixer_options, got {sorted(options)}")
            return None
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown mixer_options for {self.name!r}: {unknown}; known: {sorted(known)}")
        return self.options(**options)


MIXERS: dict[str, MixerFamily] = {}


def register_mixer(name: str, options: type | None = None) -> Callable:
    """Register ``build(config) -> MixerStack`` under ``name``.

    ``options`` is a dataclass for ``EncoderConfig.mixer_options``; it should raise ``ValueError`` on
    impossible values in ``__post_init__``.
    """

    def decorator(build: Callable[[Any], MixerStack]) -> Callable[[Any], MixerStack]:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is already registered")
        MIXERS[name] = MixerFamily(name, build, options)
        return build

    return decorator


def build_stack(config: Any) -> MixerStack:
    return MIXERS[config.mixer].build(config)


def checkpoint_blocks(module: nn.Module) -> int:
    """Activation checkpointing for every mixer stack in ``module`` (an encoder, or a model holding one):
    in the training form each block keeps only its input, and its activations are recomputed in backward
    (about one more forward pass of compute for memory that no longer grows with depth). Gradients are
    unchanged; streaming (``step``) is untouched. Returns the number of stacks.

    Raises:
        ValueError: ``module`` holds no mixer stack (e.g. a Hugging Face encoder), or a stack whose family
            runs its blocks otherwise (the segment-based ``amtrf`` and ``emformer``).
    """
    stacks = [m for m in module.modules() if isinstance(m, MixerStack)]
    if not stacks:
        raise ValueError(f"activation_checkpointing needs a streamssl encoder; {type(module).__name__} holds no "
                         "mixer stack")
    for stack in stacks:
        if not stack.supports_checkpointing:
            raise ValueError(f"activation_checkpointing: {type(stack).__name__} runs all its layers per segment "
                             "and does not support it; use grad_accum_steps to save memory")
    for stack in stacks:
        stack.checkpointing = True
    return len(stacks)
