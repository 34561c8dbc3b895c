"""Selective fine-tuning (docs/methods.md section 4): swap the self-attention of chosen layers of a pretrained
model for freshly initialised mixers, and train only those (and the output head).

The frozen part keeps no activations for backward. Every parameter upstream of the first replaced layer
has ``requires_grad=False`` and the input does not require grad, so autograd records nothing there: the
same saving as running that part under ``torch.no_grad()``, without having to split the model's forward.
A forward pre-hook on the first replaced layer also detaches its input, so the property holds when a
caller feeds an input that requires grad. Layers after the first replaced one still record the graph
(gradients flow back through them), but frozen weights need no weight gradients and no optimiser state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from streamssl.encoder import Encoder
from streamssl.mixers import LayerStack
from streamssl.selective.hf import replace_in_hf_model
from streamssl.selective.layers import build_layer_mixer, cut_graph_before, freeze_all_but, parse_layers, split_options

SPEC_ATTRIBUTE = "selective_replacement"
"""Attribute under which :func:`replace_attention` records what it did on the model it changed."""


@dataclass
class Replacement:
    """What :func:`replace_attention` did; enough to redo it on a freshly built model before loading weights.

    ``layers``: replaced layer indices (ascending); ``mixer``: the mixer family's name; ``options``: the
    keyword options as given (defaults are filled in again when the replacement is redone).
    """

    layers: tuple[int, ...]
    mixer: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "mixer": self.mixer, "options": copy.deepcopy(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Replacement":
        unknown = sorted(set(data) - {"layers", "mixer", "options"})
        if unknown:
            raise ValueError(f"unknown keys in a selective replacement record: {unknown}")
        return cls(tuple(int(i) for i in data["layers"]), str(data["mixer"]), dict(data.get("options") or {}))

    def apply(self, model: nn.Module) -> nn.Module:
        """Redo the replacement on ``model`` (built from the same configuration)."""
        return replace_attention(model, list(self.layers), self.mixer, **self.options)


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` moved to the device and floating dtype of ``reference``'s first parameter."""
    parameter = next(reference.parameters(), None)
    if parameter is None:
        return module
    return module.to(device=parameter.device, dtype=parameter.dtype)


def _replace_in_encoder(encoder: Encoder, indices: list[int], mixer: str, options: dict[str, Any]) -> list[nn.Module]:
    if not isinstance(encoder.stack, LayerStack):
        raise ValueError(f"the encoder's mixer {encoder.config.mixer!r} couples its layers "
                         f"({type(encoder.stack).__name__}); only per-layer stacks can have layers replaced")
    config = encoder.config
    layer_options, mixer_options = split_options(options)
    rights = config.right_frames_per_layer()
    new_mixers = []
    for index in indices:
        block = encoder.stack.blocks[index]
        new = build_layer_mixer(mixer, config.d_model,
                                n_heads=layer_options.get("n_heads", config.n_heads),
                                left_frames=layer_options.get("left_frames", config.left_frames),
                                right_frames=layer_options.get("right_frames", rights[index]),
                                block_frames=layer_options.get("block_frames", config.block_frames),
                                mixer_options=mixer_options)
        block.mixer = _like(new, block)
        new_mixers.append(block.mixer)
    cut_graph_before(encoder.stack.blocks[indices[0]])
    return new_mixers


def replace_attention(model: nn.Module, layers: int | str | Sequence[int], mixer: str = "wsm",
                      **options: Any) -> nn.Module:
    """Replace the self-attention of ``layers`` with fresh ``mixer`` layers; freeze everything else.

    Args:
        model: a Hugging Face ``Wav2Vec2Model``/``Wav2Vec2ForCTC``, ``HubertModel``/``HubertForCTC``,
            ``WavLMModel``/``WavLMForCTC``; a streamssl :class:`~streamssl.Encoder`; or a module with an
            ``encoder`` attribute that is an :class:`~streamssl.Encoder` (e.g. the CTC model), whose
            parts outside the encoder (the head) stay trainable. The ``lm_head`` of a Hugging Face
            ``ForCTC`` model stays trainable too.
        layers: indices (negative ones count from the end), ``"last:K"`` or ``"i,j,k"``.
        mixer: a registered mixer family with a per-layer form: ``wsm`` (default), ``summary``, ``full``,
            ``maa``, ``sa``.
        options: layer options ``left_frames``, ``right_frames`` (frames), ``n_heads``, ``block_frames``,
            and any ``mixer_options`` of the family (e.g. ``summary="global"``, ``windows=[(16, 16)]``).
            Defaults for a streamssl encoder: its own ``left_frames``, per-layer ``right_frames``,
            ``n_heads`` and the family's defaults, so a streaming encoder still streams with the same
            declared look-ahead. Defaults for a Hugging Face model (offline, bidirectional): see
            :data:`streamssl.selective.hf.HF_DEFAULTS`.

    Returns:
        ``model``, changed in place: the chosen layers hold new mixers (the only trainable parameters
        with the head), and the replacement is recorded as ``model.selective_replacement``
        (a :class:`Replacement`) so checkpoints can rebuild the architecture. Shapes of all outputs are
        unchanged: ``(B, T, D)`` hidden states, with ``T`` frames of the model's frame rate.
    """
    if getattr(model, SPEC_ATTRIBUTE, None) is not None:
        raise ValueError("replace_attention was already applied to this model; call it once with every layer")
    encoder = model if isinstance(model, Encoder) else getattr(model, "encoder", None)
    if isinstance(encoder, Encoder):
        indices = parse_layers(layers, encoder.config.n_layers)
        new_mixers = _replace_in_encoder(encoder, indices, mixer, options)
        head = [m for name, m in model.named_children() if m is not encoder] if model is not encoder else []
        freeze_all_but(model, new_mixers + head)
    else:
        indices, new_mixers, head = replace_in_hf_model(model, layers, mixer, options)
        freeze_all_but(model, new_mixers + head)
    setattr(model, SPEC_ATTRIBUTE, Replacement(tuple(indices), mixer, dict(options)))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def trainable_modules_summary(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad, for logs and tests."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


__all__ = ["Replacement", "count_parameters", "replace_attention", "trainable_modules_summary"]
