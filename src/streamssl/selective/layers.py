"""The pieces both kinds of replacement share: which layers, a fresh mixer for one layer, freezing.

:mod:`streamssl.selective.replace` (streamssl encoders) and :mod:`streamssl.selective.hf` (Hugging Face
models) build on these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from streamssl.config import EncoderConfig
from streamssl.mixers import MIXERS, LayerMixer, LayerStack, build_stack

LAYER_OPTIONS = ("left_frames", "right_frames", "n_heads", "block_frames")
"""Keyword options of :func:`~streamssl.selective.replace_attention` that shape the layer; every other
one is a mixer option."""


def parse_layers(layers: int | str | Sequence[int], n_layers: int) -> list[int]:
    """Layer indices from an int, a sequence of ints, ``"last:K"`` or a comma list such as ``"8,10,11"``.

    Negative indices count from the end. Returns sorted distinct indices in ``[0, n_layers)``.
    """
    if isinstance(layers, str):
        text = layers.strip()
        if text.startswith("last:"):
            count_text = text[len("last:"):]
            if not count_text.isdigit() or not 0 < int(count_text) <= n_layers:
                raise ValueError(f"layers {layers!r}: 'last:K' needs 1 <= K <= {n_layers} (the model's layers)")
            return list(range(n_layers - int(count_text), n_layers))
        try:
            indices = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"layers {layers!r}: expected 'last:K' or comma-separated indices") from None
    elif isinstance(layers, int) and not isinstance(layers, bool):
        indices = [layers]
    else:
        indices = list(layers)
        if not indices or any(not isinstance(i, int) or isinstance(i, bool) for i in indices):
            raise ValueError(f"layers must be a non-empty list of integers, 'last:K' or an integer, got {layers!r}")
    resolved = []
    for index in indices:
        if not -n_layers <= index < n_layers:
            raise ValueError(f"layer {index} is out of range for a model with {n_layers} layers")
        resolved.append(index % n_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers {layers!r} name a layer twice")
    return sorted(resolved)


def build_layer_mixer(mixer: str, d_model: int, n_heads: int, left_frames: int | None, right_frames: int,
                      block_frames: int | None = None, mixer_options: dict[str, Any] | None = None) -> LayerMixer:
    """A freshly initialised mixer for one layer of width ``d_model``, built by the mixer registry.

    The family builds a one-layer stack from an :class:`EncoderConfig`, so its options are validated
    exactly as in an encoder; families that couple their layers (no per-layer mixer) are refused.
    """
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; registered mixers: {sorted(MIXERS)}")
    config = EncoderConfig(frontend="none", frontend_options={"input_dim": d_model}, d_model=d_model,
                           n_layers=1, n_heads=n_heads, ffn_dim=1, dropout=0.0, pos_conv_kernel=1, pos_conv_groups=1, mixer=mixer,
                           left_frames=left_frames, right_frames=right_frames, block_frames=block_frames,
                           mixer_options=dict(mixer_options or {}))
    stack = build_stack(config)
    if not isinstance(stack, LayerStack):
        raise ValueError(f"mixer {mixer!r} couples the layers of its stack ({type(stack).__name__}) and has no "
                         "per-layer form to put in place of one attention layer")
    return stack.blocks[0].mixer


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(layer options, mixer options)`` from :func:`replace_attention`'s keyword options."""
    layer = {k: v for k, v in options.items() if k in LAYER_OPTIONS}
    return layer, {k: v for k, v in options.items() if k not in LAYER_OPTIONS}


def cut_graph_before(layer: nn.Module) -> None:
    """Detach the hidden states entering ``layer`` (first positional argument or ``hidden_states``)."""

    def detach_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].detach(),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    layer.register_forward_pre_hook(detach_input, with_kwargs=True)


def freeze_all_but(model: nn.Module, trainable: list[nn.Module]) -> None:
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
