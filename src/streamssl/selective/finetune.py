"""Selective fine-tuning inside ``streamssl finetune``: what trains, and Hugging Face models as ``--init``.

``FinetuneConfig.train_mode`` picks what trains:

* ``"full"``: the whole model (the frontend stays frozen when starting from ``init``, as before);
* ``"frozen"``: only the CTC head; the encoder is fixed;
* ``"replace"``: the self-attention of ``replace_layers`` (e.g. ``"last:4"``) is replaced by fresh
  ``replace_mixer`` layers (``replace_options`` are their options); they and the head train.

``--init hf:DIR`` starts from a Hugging Face wav2vec 2.0 / HuBERT / WavLM model saved in ``DIR`` (or a hub
id where there is network). Its base model is kept and a new CTC head over streamssl's character vocabulary
is put on top (:class:`HFCTCModel`). A checkpoint stores the Hugging Face configuration in place of an
:class:`~streamssl.EncoderConfig` (:class:`HFEncoderSpec`), so it rebuilds without ``DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from streamssl.latency import Latency
from streamssl.masking import span_mask
from streamssl.selective.layers import freeze_all_but
from streamssl.selective.replace import Replacement, replace_attention

def _head_modules(model: nn.Module) -> list[nn.Module]:
    return [module for name, module in model.named_children() if name != "encoder"]


def apply_train_mode(model: nn.Module, train_mode: str, replace_layers: str | None = None,
                     replace_mixer: str = "wsm", replace_options: dict[str, Any] | None = None) -> nn.Module:
    """Make ``model`` (a ``CTCModel`` or :class:`HFCTCModel`) train what ``train_mode`` says, in place.

    Call it after the initial encoder weights are loaded (replacement discards the replaced attention
    weights) and before loading a checkpoint of a run made with the same mode.
    """
    if train_mode == "full":
        return model
    if train_mode == "frozen":
        freeze_all_but(model, _head_modules(model))
        return model
    if train_mode != "replace":
        raise ValueError(f"unknown train_mode {train_mode!r}; modes: 'full', 'frozen', 'replace'")
    options = dict(replace_options or {})
    if isinstance(model, HFCTCModel):
        replace_attention(model.encoder, replace_layers, replace_mixer, **options)
        model.output.requires_grad_(True)
    else:
        replace_attention(model, replace_layers, replace_mixer, **options)
    return model


# ---------------------------------------------------------------------------------- Hugging Face models
class HFEncoderSpec:
    """Stands in for an :class:`~streamssl.EncoderConfig` when the encoder is a Hugging Face model.

    ``hf_config``: the model's ``config.to_dict()`` (its ``model_type`` picks the class).
    """

    def __init__(self, hf_config: dict[str, Any]):
        from streamssl.selective.hf import FAMILIES

        model_type = hf_config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: {FAMILIES}")
        self.hf_config = dict(hf_config)

    @property
    def mixer(self) -> str:
        """Label in logs and result tables."""
        return f"hf-{self.hf_config['model_type']}"

    def to_dict(self) -> dict[str, Any]:
        return {"hf_config": self.hf_config}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HFEncoderSpec":
        return cls(data["hf_config"])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml") \
            else json.dumps(self.to_dict(), indent=2) + "\n"
        path.write_text(text)

    def build(self) -> nn.Module:
        """A freshly initialised base model (``Wav2Vec2Model``, ``HubertModel`` or ``WavLMModel``)."""
        import transformers

        config = transformers.AutoConfig.for_model(**self.hf_config)
        return transformers.AutoModel.from_config(config)


def encoder_config_from_dict(data: dict[str, Any]):
    """An :class:`~streamssl.EncoderConfig` or, for a Hugging Face encoder, an :class:`HFEncoderSpec`."""
    from streamssl.config import EncoderConfig

    if "hf_config" in data:
        return HFEncoderSpec.from_dict(data)
    return EncoderConfig.from_dict(data)


def load_hf_encoder(location: str) -> tuple[HFEncoderSpec, dict[str, Tensor]]:
    """The spec and base-model weights of a Hugging Face model in ``location`` (``INIT_SOURCES["hf"]``)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--init hf:... needs the transformers package: pip install 'streamssl[hf]'") from None
    try:
        model = transformers.AutoModel.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a Hugging Face model from {location!r}: {error}") from None
    return HFEncoderSpec(model.config.to_dict()), model.state_dict()


class HFCTCModel(nn.Module):
    """A Hugging Face base model with a linear CTC head over a :class:`~streamssl.asr.ctc.CharVocab`.

    Offline only (the Hugging Face encoders attend to the whole utterance). Same offline interface as
    ``CTCModel``: ``forward(x, lengths, mask_seeds, train_encoder)`` -> ``(B, T, V)`` float32
    log-probabilities and ``(B,)`` frame counts; ``encoder``, ``vocab``, and the rest of
    :class:`~streamssl.asr.ctc.RecognitionModel`, whose ``stream_error()`` always says why it cannot stream.

    Time masking uses the base model's own masked-frame embedding with streamssl's seeded span masks,
    so runs stay reproducible; the model's own random SpecAugment is switched off. The sample-level
    padding mask is always passed (the replaced layers need it), also to GroupNorm models for which
    Hugging Face recommends plain zero padding.
    """

    def __init__(self, spec: HFEncoderSpec, vocab=None, mask_prob: float = 0.0, mask_length: int = 10,
                 freeze_frontend: bool = False):
        from streamssl.asr.ctc import CharVocab

        super().__init__()
        self.spec = spec
        self.vocab = vocab or CharVocab()
        self.encoder = spec.build()
        self.encoder.config.mask_time_prob = 0.0
        self.encoder.config.mask_feature_prob = 0.0
        self.mask_prob, self.mask_length = mask_prob, mask_length
        if freeze_frontend:
            self.encoder.feature_extractor._freeze_parameters()
        self.output = nn.Linear(self.encoder.config.hidden_size, len(self.vocab))

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask_seeds: list[int] | None = None,
                train_encoder: bool = True) -> tuple[Tensor, Tensor]:
        """Waveform ``(B, S)`` at 16 kHz -> log-probabilities ``(B, T, V)`` and valid frames ``(B,)``."""
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        sample_mask = (torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).long()
        frame_lengths = self.encoder._get_feat_extract_output_lengths(lengths).to(torch.long)
        frames = int(self.encoder._get_feat_extract_output_lengths(torch.tensor(x.shape[1])))
        kwargs = {}
        if mask_seeds is not None and self.mask_prob > 0 and self.training \
                and getattr(self.encoder, "masked_spec_embed", None) is not None:
            kwargs["mask_time_indices"] = span_mask(frame_lengths, mask_seeds, self.mask_prob, self.mask_length,
                                                    frames)
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
            hidden = self.encoder(x, attention_mask=sample_mask, **kwargs).last_hidden_state
        return self.output(hidden).float().log_softmax(-1), frame_lengths

    # ------------------------------------------------------------ RecognitionModel (offline only)
    sample_rate = 16000

    def _conv_frames(self) -> tuple[int, int]:
        """``(hop, receptive field)`` in samples of the convolution feature extractor."""
        config = self.encoder.config
        hop = receptive = 1
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
            receptive = (receptive - 1) * stride + kernel
        for stride in config.conv_stride:
            hop *= stride
        return hop, receptive

    @property
    def hop_samples(self) -> int:
        return self._conv_frames()[0]

    @property
    def window_samples(self) -> int:
        return self._conv_frames()[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def latency(self) -> Latency:
        hop, receptive = self._conv_frames()
        sample_ms = 1000.0 / self.sample_rate
        return Latency(mixer=self.spec.mixer, n_layers=self.encoder.config.num_hidden_layers,
                       frame_ms=hop * sample_ms, frontend_lookahead_ms=(receptive - hop) * sample_ms,
                       frontend_receptive_field_ms=receptive * sample_ms, encoder_lookahead_frames=None,
                       encoder_mean_lookahead_frames=None, streamable=False)

    def stream_error(self) -> str:
        return (f"cannot stream: {self.spec.mixer} is a Hugging Face encoder that attends to the whole "
                "utterance; evaluate it offline")

    def init_state(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(self.stream_error())

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(self.stream_error())

    def flush(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(self.stream_error())


__all__ = ["HFCTCModel", "HFEncoderSpec", "Replacement", "apply_train_mode", "encoder_config_from_dict",
           "load_hf_encoder"]
