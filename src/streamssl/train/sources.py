"""Where a fine-tuning run's encoder comes from: ``FinetuneConfig.init``.

``init`` is ``SOURCE:LOCATION`` or a plain path. A plain path is a streamssl checkpoint (``pretrain``
or ``finetune``) whose encoder weights are copied. Other sources register a loader in
:data:`INIT_SOURCES`, such as ``hf:DIR`` (a local Hugging Face wav2vec 2.0 / HuBERT / WavLM model).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from streamssl.config import EncoderConfig
from streamssl.selective.finetune import load_hf_encoder
from streamssl.train.checkpoint import naming, read_payload

InitLoader = Callable[[str], tuple[EncoderConfig, dict[str, Tensor]]]


def load_streamssl_encoder(location: str) -> tuple[EncoderConfig, dict[str, Tensor]]:
    """Encoder configuration and ``Encoder`` state dict of a streamssl checkpoint (file or run folder)."""
    payload = read_payload(location)
    prefix = "encoder."
    with naming(location):
        weights = {k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)}
        return EncoderConfig.from_dict(payload["encoder_config"]), weights


INIT_SOURCES: dict[str, InitLoader] = {"": load_streamssl_encoder, "hf": load_hf_encoder}


def resolve_init(spec: str) -> tuple[EncoderConfig, dict[str, Tensor]]:
    """The encoder named by ``spec``; ``ValueError`` for an unknown source or an unreadable one."""
    source, sep, location = spec.partition(":")
    if not sep or len(source) == 1 or source not in INIT_SOURCES and "/" in source:
        source, location = "", spec  # a plain path (also a Windows drive letter or a path with ':')
    if source not in INIT_SOURCES:
        raise ValueError(f"unknown init source {source!r} in {spec!r}; known: "
                         f"{sorted(s for s in INIT_SOURCES if s) or 'none'} or a checkpoint path")
    return INIT_SOURCES[source](location)

