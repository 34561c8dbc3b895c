"""Checkpoints that rebuild their model on their own and resume a run exactly.

A checkpoint is one ``torch.save`` file holding a dict::

    format         "streamssl-checkpoint"; version: 1 (a newer version is refused with a clear error)
    kind           "pretrain" (an objective of streamssl.objectives.OBJECTIVES) or "finetune" (a CTCModel)
    encoder_config EncoderConfig.to_dict()
    task_config    PretrainConfig / FinetuneConfig .to_dict()
    vocab          CTC output symbols (finetune only)
    vocab_kind     "characters" or "sentencepiece" (absent in older checkpoints: characters)
    vocab_model    the serialised sentencepiece model (bytes) of a sentencepiece vocabulary, else None
    model          state_dict of the whole model
    optimizer, scheduler   their state_dicts
    progress       {"step", "epoch", "batch_in_epoch"}: updates done, epoch, batches of it consumed
    rng            torch (and CUDA) generator states, Python's and NumPy's, per rank
    metrics        the latest logged training and dev metrics

:func:`load_checkpoint` returns the rebuilt model with its weights, in eval mode, on the CPU. Files are
read with ``torch.load(weights_only=True)``: tensors and plain data only, so a checkpoint cannot run code.
"""

from __future__ import annotations

import codecs
import os
import pickle
import random
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from streamssl.config import EncoderConfig
from streamssl.frontends import FRONTENDS
from streamssl.train.config import FinetuneConfig, PretrainConfig, RunConfig

FORMAT = "streamssl-checkpoint"
VERSION = 1
KINDS = ("pretrain", "finetune")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt ``model`` and what it came with."""

    path: Path
    kind: str
    config: RunConfig
    encoder_config: EncoderConfig
    model: nn.Module
    step: int
    payload: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.step >= self.config.steps

    @property
    def mixer_label(self) -> str:
        """The encoder's mixers in one name, e.g. ``sa`` or ``sa+wsm(last:1)`` (see :func:`mixer_label`)."""
        return mixer_label(self.config, self.encoder_config)


def _replaces_layers(config: RunConfig) -> bool:
    return isinstance(config, FinetuneConfig) and config.train_mode == "replace"


def layer_mixers(config: RunConfig, encoder_config) -> list[str]:
    """The mixer of each layer of the model ``config`` builds on ``encoder_config``, first to last: the
    encoder's own (``hf-<model_type>`` for a Hugging Face encoder), except in the layers whose attention a
    fine-tuning run's ``train_mode: replace`` (``--replace``) gave to fresh ``replace_mixer`` layers."""
    from streamssl.selective import parse_layers

    n_layers = (encoder_config.n_layers if isinstance(encoder_config, EncoderConfig)
                else int(encoder_config.hf_config["num_hidden_layers"]))
    mixers = [encoder_config.mixer] * n_layers
    if _replaces_layers(config):
        for index in parse_layers(config.replace_layers, n_layers):
            mixers[index] = config.replace_mixer
    return mixers


def mixer_label(config: RunConfig, encoder_config) -> str:
    """A name for logs and result tables: the encoder's mixer (``sa``), or after ``--replace`` the encoder's
    mixer, ``+``, the new one and the replaced layers as ``--replace`` named them (``sa+wsm(last:1)``)."""
    if _replaces_layers(config):
        return f"{encoder_config.mixer}+{config.replace_mixer}({config.replace_layers})"
    return encoder_config.mixer


def encoder_record(config: RunConfig, encoder_config) -> dict[str, Any]:
    """What a run folder's ``encoder.yaml`` holds: the fields of ``encoder_config`` (the configuration the
    encoder was built from) and, when ``--replace`` gave some layers another mixer, ``layer_mixers``: the
    real mixer of each layer, first to last (:func:`layer_mixers`)."""
    record = encoder_config.to_dict()
    if _replaces_layers(config):
        record["layer_mixers"] = layer_mixers(config, encoder_config)
    return record


def payload_vocab(payload: dict[str, Any]):
    """The CTC vocabulary a finetune checkpoint's payload holds (:class:`CharVocab` or
    :class:`SentencePieceVocab`), rebuilt from the checkpoint alone; ``None`` for pretraining."""
    from streamssl.asr.vocab import make_vocab

    if payload.get("vocab") is None:
        return None
    return make_vocab(payload.get("vocab_kind", "characters"), payload["vocab"], payload.get("vocab_model"))


def vocab_entries(vocab) -> dict[str, Any]:
    """What a checkpoint stores of ``vocab`` (see :func:`payload_vocab`)."""
    if vocab is None:
        return {"vocab": None, "vocab_kind": None, "vocab_model": None}
    return {"vocab": list(vocab.symbols), "vocab_kind": vocab.kind, "vocab_model": getattr(vocab, "model_proto", None)}


def build_model(kind: str, config: RunConfig, encoder_config: EncoderConfig, vocab=None) -> nn.Module:
    """A freshly initialised model of ``kind`` for ``config``, with ``encoder_config`` as its encoder
    (and ``vocab``, a :class:`CharVocab` or :class:`SentencePieceVocab`, as the output of a finetune model;
    default :class:`CharVocab`)."""
    if kind == "pretrain":
        from streamssl.objectives import OBJECTIVES

        assert isinstance(config, PretrainConfig)
        return OBJECTIVES[config.objective](encoder_config, config.parsed_objective_options())
    if kind == "finetune":
        from streamssl.asr.ctc import CTCModel

        assert isinstance(config, FinetuneConfig)
        from streamssl.selective.finetune import HFCTCModel, HFEncoderSpec

        freeze = config.freeze_frontend
        if freeze is None:
            frozen_by_default = (isinstance(encoder_config, HFEncoderSpec)
                                 or FRONTENDS[encoder_config.frontend].frozen_when_fine_tuned)
            freeze = config.init is not None and frozen_by_default
        if isinstance(encoder_config, HFEncoderSpec):
            return HFCTCModel(encoder_config, vocab,
                              mask_prob=config.mask_prob, mask_length=config.mask_length, freeze_frontend=freeze)
        return CTCModel(encoder_config, head=config.head, lstm_hidden=config.lstm_hidden,
                        lstm_layers=config.lstm_layers, bidirectional=config.bidirectional,
                        mask_prob=config.mask_prob, mask_length=config.mask_length, freeze_frontend=freeze,
                        vocab=vocab)
    raise ValueError(f"unknown checkpoint kind {kind!r}; kinds: {KINDS}")


def rng_state() -> dict[str, Any]:
    """Every global generator's state as plain Python objects (bytes, lists), so ranks can gather them."""
    np_state = np.random.get_state()
    return {"torch": bytes(torch.get_rng_state().numpy()),
            "cuda": [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a run killed while saving keeps its previous checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)


def _not_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a file ``torch.save`` wrote (a zip archive, or a pickle in the old format),
    judged from its bytes; ``None`` if it may be one. Asking torch would answer such files with an
    unpickler's internals ("pop from empty list", advice to load them unrestricted)."""
    with path.open("rb") as file:
        head = file.read(512)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return None if zipfile.is_zipfile(path) else "a zip archive without its end: truncated or damaged"
    if head.startswith(b"\x80"):
        return None
    try:
        # Not final: the 512 bytes may end inside a character.
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return f"neither a zip archive nor a pickle, as torch.save writes; it starts with {head[:8]!r}"
    return f"a text file, not the binary file torch.save writes; it starts with {text[:24]!r}"


def _load_plain(path: Path) -> Any:
    """``torch.load`` of ``path`` restricted to tensors and plain data: unpickling anything else could run
    code from the file. Every failure is a one-line ``ValueError`` that names the file."""
    problem = _not_torch_file(path)
    if problem is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
            problem = (f"it refers to {found.group(1)}, not only to tensors and plain data; such a file is never "
                       "unpickled, since that could run code from it" if found else
                       "a pickle, but not one of tensors and plain data as torch.save writes")
        except Exception as error:  # torch raises many types for a damaged file
            first = re.split(r"(?<=\.)\s", " ".join(str(error).split()), maxsplit=1)[0]
            problem = f"damaged: {type(error).__name__}: {first}" if first else f"damaged: {type(error).__name__}"
    raise ValueError(f"{path} is not a streamssl checkpoint ({problem})")


def read_payload(path: str | Path) -> dict[str, Any]:
    """The raw dict of a checkpoint, checked for format and kind."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    payload = _load_plain(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a streamssl checkpoint (a PyTorch file, but without the "
                         f"{FORMAT!r} format entry that streamssl pretrain and finetune write)")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: checkpoint format version {version!r} is not a valid version")
    if version > VERSION:
        raise ValueError(f"{path}: checkpoint format version {version} is newer than this streamssl reads "
                         f"(up to {VERSION}); upgrade streamssl to load it")
    if payload.get("kind") not in KINDS:
        raise ValueError(f"{path}: unknown checkpoint kind {payload.get('kind')!r}")
    return payload


def load_checkpoint(path: str | Path, kind: str | None = None) -> Checkpoint:
    """Rebuild the model of a checkpoint (a file, or a run folder holding ``checkpoint.pt``).

    ``kind``: require this kind, e.g. ``"finetune"`` for evaluation; another kind is a ``ValueError``
    that says what the file is and which command makes the right one.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    payload = read_payload(path)
    if kind is not None and payload["kind"] != kind:
        made_by = {"pretrain": "streamssl pretrain", "finetune": "streamssl finetune"}
        raise ValueError(f"{path} is a {payload['kind']} checkpoint, but a {kind} checkpoint is needed "
                         f"(made by `{made_by[kind]}`)")
    cls = PretrainConfig if payload["kind"] == "pretrain" else FinetuneConfig
    from streamssl.selective.finetune import apply_train_mode, encoder_config_from_dict

    with naming(path):
        config = cls.from_dict(payload["task_config"])
        encoder_config = encoder_config_from_dict(payload["encoder_config"])
        model = build_model(payload["kind"], config, encoder_config, payload_vocab(payload))
        if payload["kind"] == "finetune":
            apply_train_mode(model, config.train_mode, config.replace_layers, config.replace_mixer,
                             config.replace_options)
        model.load_state_dict(payload["model"])
        step = int(payload["progress"]["step"])
    model.eval()
    return Checkpoint(path, payload["kind"], config, encoder_config, model, step, payload)


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Re-raise what a checkpoint's contents fail with (a bad config, a missing entry, mismatched
    weights) as a ``ValueError`` that names the checkpoint file."""
    try:
        yield
    except KeyError as error:
        raise ValueError(f"{path}: the checkpoint lacks the entry {error}") from None
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path}: {' '.join(str(error).split())}") from None
