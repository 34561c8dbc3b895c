"""Hugging Face wav2vec 2.0, HuBERT and WavLM models: putting a streamssl mixer where a layer's attention was.

The encoder layers of these models call their attention module as
``attention(hidden_states, attention_mask=..., **kwargs)`` (WavLM adds ``position_bias=`` and ``index=``)
and unpack a tuple. What they pass and expect back depends on the family and on the transformers version:

* the mask: ``None`` (no padding), a ``(B, T)`` mask with 1/True on valid frames (WavLM; flash
  attention), or a ``(B, 1, T, T)`` mask, boolean (True: may attend) or additive float (0: may attend,
  a large negative number or -inf: masked). :func:`lengths_from_mask` turns each into valid-frame counts.
* the tuple: ``(output, weights)`` for wav2vec 2.0 and HuBERT in transformers 5,
  ``(output, weights, past_key_value)`` in older 4.x releases, and ``(output, weights, position_bias)``
  for WavLM in every release. :class:`HFMixerAttention` returns as many items as the attention it
  replaces, found by calling that attention once on a two-frame input before replacing it.
* WavLM's first layer computes the relative position bias the later layers reuse. When that layer is
  replaced, the stand-in keeps the original's bias table (frozen) and computes the same bias.

Padded frames are never read by the new mixers (they mask by lengths); attention weights are not
computed, so ``output_attentions`` yields ``None`` for replaced layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from streamssl.mixers import LayerMixer
from streamssl.selective.layers import build_layer_mixer, cut_graph_before, parse_layers, split_options

FAMILIES = ("wav2vec2", "hubert", "wavlm")
"""``config.model_type`` of the supported Hugging Face models."""

HF_WINDOW_FRAMES = 16
"""Default half-width of the WSM local window on Hugging Face models: 16 frames, 320 ms at 20 ms."""

HF_DEFAULTS: dict[str, Any] = {"left_frames": None, "right_frames": HF_WINDOW_FRAMES}
"""Layer defaults on Hugging Face models, which are offline and bidirectional: unlimited left context
and ``HF_WINDOW_FRAMES`` of look-ahead (used by ``sa``/``maa``; ``full`` ignores both). ``summary`` and
``wsm`` default to ``summary="global"`` (mean over the whole utterance) and ``wsm`` to one symmetric
window ``(HF_WINDOW_FRAMES, HF_WINDOW_FRAMES)``."""

_POSITION_BIAS_KEEP = ("rel_attn_embed",)


def lengths_from_mask(mask: Any, batch: int, frames: int, device: torch.device) -> Tensor:
    """Valid frames per utterance ``(B,)`` from any attention mask an HF encoder layer passes.

    Raises ``ValueError`` for a mask that is not right-padded (a valid frame after a padded one) or of
    a kind the mixers cannot express (flex attention's ``BlockMask``).
    """
    if mask is None:
        return torch.full((batch,), frames, dtype=torch.long, device=device)
    if not isinstance(mask, Tensor):
        raise ValueError(f"replaced layers take a tensor attention mask, got {type(mask).__name__}; "
                         "load the model with attn_implementation='eager' or 'sdpa'")
    if mask.dim() == 2:
        valid = mask != 0
    elif mask.dim() == 4:
        # Row of the first query frame, which is always valid: in a padding mask it is the key mask.
        row = mask[:, 0, 0, :]
        valid = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    if valid.shape != (batch, frames):
        raise ValueError(f"attention mask covers {tuple(valid.shape)} (batch, frames) but hidden states have "
                         f"{(batch, frames)}")
    lengths = valid.sum(-1)
    prefix = torch.arange(frames, device=valid.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(prefix, valid):
        raise ValueError("replaced layers need right-padded attention masks (valid frames first)")
    if (lengths == 0).any():
        raise ValueError("an utterance has no valid frame in the attention mask")
    return lengths.to(device=device, dtype=torch.long)


class HFMixerAttention(nn.Module):
    """A :class:`LayerMixer` behind the call signature of an HF encoder layer's attention module.

    Args:
        mixer: the new mixer; it sees the layer's attention input ``(B, T, D)`` and valid lengths.
        n_outputs: length of the tuple the layer unpacks (1 means a bare tensor).
        position_bias_source: WavLM's first attention, pruned to its relative-position table, when the
            replaced layer is the one that computes the bias for the others.
    """

    def __init__(self, mixer: LayerMixer, n_outputs: int, position_bias_source: nn.Module | None = None):
        super().__init__()
        self.mixer = mixer
        self.n_outputs = n_outputs
        self.position_bias_source = position_bias_source

    def forward(self, hidden_states: Tensor, *, attention_mask: Any = None, position_bias: Tensor | None = None,
                **unused: Any) -> Tensor | tuple[Tensor | None, ...]:
        """``hidden_states`` (B, T, D) -> (B, T, D), in the tuple shape the layer expects."""
        batch, frames, _ = hidden_states.shape
        lengths = lengths_from_mask(attention_mask, batch, frames, hidden_states.device)
        output = self.mixer(hidden_states, lengths)
        if self.n_outputs == 1:
            return output
        if position_bias is None and self.position_bias_source is not None:
            position_bias = self._position_bias(batch, frames)
        return (output, None, position_bias)[:self.n_outputs]

    def _position_bias(self, batch: int, frames: int) -> Tensor:
        """WavLM's ungated relative position bias, ``(B * H, T, T)`` as its first attention returns it."""
        bias = self.position_bias_source.compute_bias(frames, frames)
        heads = bias.shape[0]
        return bias.unsqueeze(0).expand(batch, heads, frames, frames).reshape(batch * heads, frames, frames)


def _count_outputs(attention: nn.Module, d_model: int, n_heads: int) -> int:
    """How many items ``attention`` returns, from one call on a two-frame input."""
    parameter = next(attention.parameters())
    x = torch.zeros(1, 2, d_model, device=parameter.device, dtype=parameter.dtype)
    kwargs = {}
    if "position_bias" in inspect.signature(attention.forward).parameters:
        kwargs["position_bias"] = torch.zeros(n_heads, 2, 2, device=parameter.device, dtype=parameter.dtype)
    was_training = attention.training
    attention.eval()
    with torch.no_grad():
        out = attention(x, **kwargs)
    attention.train(was_training)
    return len(out) if isinstance(out, tuple) else 1


def _position_bias_source(attention: nn.Module) -> nn.Module | None:
    """WavLM's bias-computing attention without the projections the stand-in no longer uses."""
    if getattr(attention, "rel_attn_embed", None) is None:
        return None
    for name in [n for n, _ in attention.named_children() if n not in _POSITION_BIAS_KEEP]:
        delattr(attention, name)
    for name in [n for n, _ in attention.named_parameters(recurse=False)]:
        delattr(attention, name)
    return attention


def is_hf_speech_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in FAMILIES and hasattr(model, "base_model")


def _defaults(mixer: str, mixer_options: dict[str, Any]) -> dict[str, Any]:
    filled = dict(mixer_options)
    if mixer in ("summary", "wsm"):
        filled.setdefault("summary", "global")
    if mixer == "wsm":
        filled.setdefault("windows", ((HF_WINDOW_FRAMES, HF_WINDOW_FRAMES),))
    return filled


def replace_in_hf_model(model: nn.Module, layers: int | str | Sequence[int], mixer: str,
                        options: dict[str, Any]) -> tuple[list[int], list[nn.Module], list[nn.Module]]:
    """Put ``mixer`` layers in place of the chosen attentions of an HF model.

    Returns the replaced indices, the new modules and the head modules to train (``lm_head`` of a
    ``ForCTC`` model; none for a base model). Freezing is left to the caller.
    """
    if not is_hf_speech_model(model):
        raise ValueError(f"replace_attention supports Hugging Face {', '.join(FAMILIES)} models and streamssl "
                         f"Encoders, got {type(model).__name__}")
    base = model.base_model
    encoder_layers = base.encoder.layers
    config = model.config
    indices = parse_layers(layers, len(encoder_layers))
    layer_options, mixer_options = split_options(options)
    layer_options = {**HF_DEFAULTS, "n_heads": config.num_attention_heads, **layer_options}
    mixer_options = _defaults(mixer, mixer_options)

    new_modules = []
    for index in indices:
        layer = encoder_layers[index]
        original = layer.attention
        n_outputs = _count_outputs(original, config.hidden_size, config.num_attention_heads)
        new_mixer = build_layer_mixer(mixer, config.hidden_size, mixer_options=mixer_options, **layer_options)
        parameter = next(original.parameters())
        new_mixer = new_mixer.to(device=parameter.device, dtype=parameter.dtype)
        layer.attention = HFMixerAttention(new_mixer, n_outputs, _position_bias_source(original))
        new_modules.append(new_mixer)

    # HF's feature encoder sets requires_grad on its input in training mode (for gradient checkpointing)
    # unless it is frozen this way; that would make autograd record the whole frozen prefix.
    feature_encoder = getattr(base, "feature_extractor", None)
    if feature_encoder is not None and hasattr(feature_encoder, "_freeze_parameters"):
        feature_encoder._freeze_parameters()
    cut_graph_before(encoder_layers[indices[0]])
    head = getattr(model, "lm_head", None)
    return indices, new_modules, [head] if isinstance(head, nn.Module) and model is not base else []
