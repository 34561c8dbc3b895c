"""The training API: a run's configuration from its layers, and the run itself.

``streamssl pretrain`` / ``finetune`` (:mod:`streamssl.commands.train`) parse their arguments and call these
two functions; the demo, the recipes and the tests call them directly.

A run's configuration is built in layers: a preset (``base``: wav2vec 2.0 BASE; ``cpu-small``; ``tiny``...),
then a YAML file, then ``KEY=VALUE`` pairs (``encoder.KEY`` for encoder fields, ``objective_options.KEY`` for
the objective's options), then named values (``train_data``, ``steps``...); later layers win.

Given its configuration (seed included) and the number of torch threads, a CPU run is bit-identical from one
process to the next: see :func:`streamssl.train.trainer.reproducible`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from streamssl.train.config import PRESETS, FinetuneConfig, PretrainConfig, RunConfig

# Mapping fields that ``KEY.SUBKEY=VALUE`` pairs set one entry of.
NESTED_FIELDS = ("encoder", "objective_options", "vocab")


def build_config(kind: str, preset_name: str, config_path: str | None = None,
                 sets: list[tuple[str, Any]] = (), **flags: Any) -> RunConfig:
    """The run configuration of ``kind`` (``"pretrain"`` or ``"finetune"``) from a preset, a YAML file,
    ``(KEY, VALUE)`` pairs and named fields (``None`` values are not given), later ones winning.

    Fine-tuning with ``init`` drops the preset's encoder (the encoder comes from the checkpoint) unless
    the file or the pairs named encoder fields explicitly, which is then an error.
    """
    cls = PretrainConfig if kind == "pretrain" else FinetuneConfig
    if preset_name not in PRESETS[kind]:
        raise ValueError(f"unknown {kind} preset {preset_name!r}; presets: {sorted(PRESETS[kind])}")
    explicit: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields")
        explicit.update(loaded)
    for key, value in sets:
        name, dot, sub = key.partition(".")
        if dot and name in NESTED_FIELDS:
            inner = explicit.get(name)
            explicit[name] = {**(inner if isinstance(inner, dict) else {}), sub: value}
        else:
            explicit[key] = value
    explicit.update({k: v for k, v in flags.items() if v is not None})
    try:
        values = cls.layered(PRESETS[kind][preset_name], explicit)
        if kind == "finetune" and values.get("init") is not None and "encoder" not in explicit:
            values.pop("encoder", None)
        return cls.from_dict(values)
    except TypeError as error:  # a mis-typed field the dataclass could not take
        raise ValueError(f"{cls.__name__}: {error}") from None


def starting_preset(kind: str, preset_name: str | None, config_path: str | None) -> str:
    """The preset a run starts from: the one named, else ``base`` under a ``--config`` file. With neither,
    a ``ValueError``: the BASE defaults (400 k pretraining updates) must never start by accident."""
    if preset_name is not None:
        return preset_name
    if config_path is not None:
        return "base"
    raise ValueError(f"{kind} needs a starting point: --preset {'|'.join(sorted(PRESETS[kind]))} (base is the "
                     "wav2vec 2.0 BASE recipe, meant for GPUs; cpu-small trains on a CPU in minutes) or "
                     "--config FILE")


def run_training(kind: str, config: RunConfig, out: str, device: str | None = None,
                 stop_after: int | None = None, progress: bool = True) -> dict[str, float]:
    """Train ``config`` in the run folder ``out`` (resuming if a checkpoint is there); checks the data
    before anything is built. Returns the latest metrics (training averages and dev scores).

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` (default: CUDA when present); ``stop_after``: checkpoint and
    stop at this step. Uses the process's torch thread count (``torch.set_num_threads``), which the numbers
    of a CPU run depend on.
    """
    from streamssl.asr.ctc import CharVocab
    from streamssl.train.data import CutSplit, load_split, spellable
    from streamssl.train.dist import close_world, init_world
    from streamssl.train.tasks import FinetuneTask, PretrainTask, finetune_vocab
    from streamssl.train.trainer import Trainer, reproducible, seed_everything

    if config.train_data is None:
        raise ValueError(f"{kind} needs training data: --train or train_data in the config")
    world = init_world(device)
    try:
        say = print if world.is_main else (lambda *a, **k: None)
        characters = kind == "finetune" and config.vocab_options().kind == "characters"
        vocab = CharVocab() if characters else None
        # Lhotse data stays lazy (a CutSplit): a large corpus is never read into one list.
        train = load_split(config.train_data, config.skip_bad, "training data", vocab, say, lazy=True,
                           sample_size=config.normalizer_utterances, seed=config.seed)
        if kind == "finetune" and not characters:
            # Subword pieces are learnt from the training transcripts, so they can spell every one of them.
            vocab = finetune_vocab(config, train, out, say)
            if not isinstance(train, CutSplit):
                train = spellable(train, vocab, config.skip_bad, "training data", config.train_data, say)
        dev = load_split(config.dev_data, config.skip_bad, "dev data", vocab, say) if config.dev_data else None
        with reproducible(world.device):
            seed_everything(config.seed, world.rank)
            task = PretrainTask(config) if kind == "pretrain" else FinetuneTask(config, say, vocab)
            n_params = sum(p.numel() for p in task.model.parameters())
            count, seconds = ((train.utterances, train.seconds) if isinstance(train, CutSplit)
                              else (len(train), sum(u.duration for u in train)))
            say(f"{kind}: {task.mixer_label} encoder, {n_params / 1e6:.2f} M parameters, "
                f"{count} training utterances ({seconds / 3600:.2f} h), "
                f"{world.size} process(es) on {world.device}, {torch.get_num_threads()} thread(s) each")
            trainer = Trainer(task, out, world, train, dev, progress=progress, log=say)
            return trainer.fit(stop_after)
    finally:
        close_world(world)
