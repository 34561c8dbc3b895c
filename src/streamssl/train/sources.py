"""Where a fine-tuning run's encoder comes from: ``FinetuneConfig.init``.

``init`` is ``SOURCE:LOCATION`` or a plain path. A plain path is a streamssl checkpoint (``pretrain``
or ``finetune``) whose encoder weights (and learned mask embedding, if any) are copied. Other sources
register a loader in :data:`INIT_SOURCES`, such as ``hf:DIR`` (a local Hugging Face wav2vec 2.0 / HuBERT /
WavLM model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from streamssl.config import EncoderConfig
from streamssl.selective.finetune import HFEncoderSpec, load_hf_encoder
from streamssl.train.checkpoint import naming, read_payload


@dataclass
class InitWeights:
    """What a fine-tuning run starts from: the encoder's configuration and state dict, and the ``(d_model,)``
    vector that stood for a masked frame in pretraining where there was one (wav2vec 2.0's; BEST-RQ masks
    with noise instead). Fine-tuning's time masks reuse it, as wav2vec 2.0 fine-tuning does: the encoder
    learned to fill in frames marked with that vector, not with a fresh one. A Hugging Face model keeps its
    own inside the encoder (``masked_spec_embed``)."""

    encoder_config: EncoderConfig | HFEncoderSpec
    encoder: dict[str, Tensor]
    mask_embedding: Tensor | None = None

    def load_into(self, model: nn.Module) -> None:
        """Copy these weights into a fresh CTC model built on ``encoder_config``."""
        model.encoder.load_state_dict(self.encoder)
        if self.mask_embedding is not None:
            with torch.no_grad():
                model.mask_embedding.copy_(self.mask_embedding)


InitLoader = Callable[[str], InitWeights]


def load_streamssl_encoder(location: str) -> InitWeights:
    """The encoder of a streamssl checkpoint (file or run folder), with its mask embedding if it has one."""
    payload = read_payload(location)
    prefix = "encoder."
    with naming(location):
        weights = {k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)}
        return InitWeights(EncoderConfig.from_dict(payload["encoder_config"]), weights,
                           payload["model"].get("mask_embedding"))


def load_hf(location: str) -> InitWeights:
    """A local Hugging Face model's base encoder (``hf:DIR``)."""
    return InitWeights(*load_hf_encoder(location))


INIT_SOURCES: dict[str, InitLoader] = {"": load_streamssl_encoder, "hf": load_hf}


def resolve_init(spec: str) -> InitWeights:
    """The encoder named by ``spec``; ``ValueError`` for an unknown source or an unreadable one."""
    source, sep, location = spec.partition(":")
    if not sep or len(source) == 1 or source not in INIT_SOURCES and "/" in source:
        source, location = "", spec  # a plain path (also a Windows drive letter or a path with ':')
    if source not in INIT_SOURCES:
        raise ValueError(f"unknown init source {source!r} in {spec!r}; known: "
                         f"{sorted(s for s in INIT_SOURCES if s) or 'none'} or a checkpoint path")
    return INIT_SOURCES[source](location)

