"""The ``streamssl`` command line; each feature area's subcommands live in :mod:`streamssl.commands`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamssl.commands import data, export, lm, serve, stream, train
from streamssl.commands.common import Parser, UsageError, add_subcommands, add_threads, use_threads

if TYPE_CHECKING:
    from streamssl.config import EncoderConfig
    from streamssl.latency import Latency

# Each provides ``add_commands(subparsers)`` and registers its own subcommands. Only the parser of the
# command being run gets its flags, and torch is imported by the commands themselves, so ``--help`` is fast.
COMMAND_MODULES = (data, train, lm, stream, serve, export)


# Top-level modules of the ``train`` extra (PyTorch and what training, corpora and export need): a command
# that imports one without it installed says which install it needs.
TRAIN_EXTRA_MODULES = frozenset({"torch", "espeakng_loader", "jiwer", "tqdm", "faker", "wordsegment",
                                 "better_profanity", "tensorboard", "onnx"})


def _left_frames(text: str) -> int | None:
    return None if text.lower() in ("none", "inf", "unlimited") else int(text)


def _right_frames(text: str) -> int | list[int]:
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def preset_names() -> list[str]:
    """The training presets (``streamssl pretrain/finetune --preset``), whose encoders ``--preset`` names."""
    from streamssl.train.config import PRESETS

    return sorted(set(PRESETS["pretrain"]) | set(PRESETS["finetune"]))


def preset_encoder(name: str) -> "EncoderConfig":
    """The encoder of training preset ``name`` (a name both kinds have gives both the same encoder)."""
    from streamssl.train.config import PRESETS, preset

    return preset("pretrain" if name in PRESETS["pretrain"] else "finetune", name).encoder


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that describe an :class:`EncoderConfig`: a preset or file, then overrides."""
    from streamssl.mixers import MIXERS

    group = parser.add_argument_group("encoder configuration")
    group.add_argument("--config", help="an encoder YAML or JSON file of EncoderConfig fields (such as a run "
                                        "folder's encoder.yaml), a run folder, or a pretrain/finetune run "
                                        "config (its encoder: fields over --preset)")
    group.add_argument("--preset", choices=preset_names(), default="base",
                       help="the encoder of this pretrain/finetune preset: base (wav2vec 2.0 BASE size, the "
                            "default), cpu-small (the demo's), tiny (tests)...")
    group.add_argument("--mixer", choices=sorted(MIXERS), help="mixer family")
    group.add_argument("--layers", type=int, dest="n_layers", help="number of blocks")
    group.add_argument("--d-model", type=int, help="model width")
    group.add_argument("--heads", type=int, dest="n_heads", help="attention heads")
    group.add_argument("--left-frames", type=_left_frames, default=argparse.SUPPRESS,
                       help="left context in frames, or 'none' for unlimited")
    group.add_argument("--right-frames", type=_right_frames,
                       help="look-ahead per layer in frames: one int, or a comma list with one per layer")
    group.add_argument("--mixer-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="an option of the mixer family (repeatable)")


def encoder_fields_of(path: str, preset: str) -> dict[str, Any]:
    """EncoderConfig fields from ``--config``: an encoder YAML/JSON file (such as a run folder's
    ``encoder.yaml``), a run folder, or a pretrain/finetune run config, whose ``encoder:`` fields go
    over the ``preset`` encoder (as ``streamssl pretrain --config`` would build it with that preset)."""
    import yaml

    from streamssl.config import EncoderConfig
    from streamssl.train.config import LEGACY_WAV2VEC2_FIELDS, FinetuneConfig, PretrainConfig

    file = Path(path) / "encoder.yaml" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file (expected an EncoderConfig YAML/JSON, a run folder "
                         "or a run config)")
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise ValueError(f"--config {file}: cannot be read: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {file}: expected a mapping of EncoderConfig fields, got {type(data).__name__}")
    encoder_keys = {f.name for f in dataclasses.fields(EncoderConfig)}
    run_keys = {f.name for cls in (PretrainConfig, FinetuneConfig) for f in dataclasses.fields(cls)}
    run_keys |= set(LEGACY_WAV2VEC2_FIELDS)  # run configs saved before objective_options held them
    if set(data) <= encoder_keys or not set(data) <= run_keys:
        return data  # unknown keys are named by EncoderConfig.from_dict
    if data.get("init"):
        raise ValueError(f"--config {file}: this run config takes its encoder from init {data['init']!r}; "
                         "pass that checkpoint's run folder instead")
    encoder = data.get("encoder") or {}
    if not isinstance(encoder, dict):
        raise ValueError(f"--config {file}: encoder must be a mapping of EncoderConfig fields")
    return {**preset_encoder(preset).to_dict(), **encoder}


def encoder_config_from_args(args: argparse.Namespace) -> "EncoderConfig":
    from streamssl.config import EncoderConfig

    if args.config:
        data = encoder_fields_of(args.config, args.preset)
    else:
        data = preset_encoder(args.preset).to_dict()
    for key in ("mixer", "n_layers", "d_model", "n_heads", "right_frames"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    if hasattr(args, "left_frames"):
        data["left_frames"] = args.left_frames
    if args.mixer_option:
        data["mixer_options"] = dict(args.mixer_option)
    return EncoderConfig.from_dict(data)


def replaced_run_latency(args: argparse.Namespace) -> "Latency | None":
    """The latency of a ``--replace`` run folder given as ``--config``: its encoder.yaml names each layer's
    mixer (``layer_mixers``), which no EncoderConfig can hold, so the run's checkpoint is built and asked;
    ``None`` for any other ``--config``."""
    import yaml

    folder = Path(args.config)
    file = folder / "encoder.yaml" if folder.is_dir() else folder
    if file.suffix not in (".yaml", ".yml") or not file.is_file():
        return None
    data = yaml.safe_load(file.read_text())
    if not isinstance(data, dict) or "layer_mixers" not in data:
        return None
    if not folder.is_dir() or not (folder / "checkpoint.pt").is_file():
        raise ValueError(f"--config {file}: a --replace run's encoder ({'+'.join(data['layer_mixers'])}); give "
                         "its run folder, with its checkpoint.pt, so the replaced layers are measured too")
    flags = [f"--{key.replace('_', '-')}" for key in ("mixer", "n_layers", "d_model", "n_heads", "right_frames")
             if getattr(args, key, None) is not None] + (["--left-frames"] if hasattr(args, "left_frames") else [])
    if flags or args.mixer_option:
        raise ValueError(f"--config {folder} is a trained --replace run: its layers cannot be changed by "
                         f"{', '.join(flags + ['--mixer-option'] * bool(args.mixer_option))}")
    from streamssl.train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(folder, kind="finetune")
    return dataclasses.replace(checkpoint.model.latency(), mixer=checkpoint.mixer_label)


def cmd_latency(args: argparse.Namespace) -> int:
    from streamssl.encoder import declared_latency
    from streamssl.tables import latency_table

    latency = replaced_run_latency(args) if args.config else None
    if latency is None:
        latency = declared_latency(encoder_config_from_args(args))
    if args.json:
        print(json.dumps(latency.to_dict(), indent=2))
    else:
        print(latency_table([latency]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamssl.demo import DEMO_THREADS, run_demo

    threads = DEMO_THREADS if args.threads is None else args.threads
    use_threads(threads)
    run_demo(args.out, progress=not args.no_progress, threads=threads)
    return 0


def _latency_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=cmd_latency)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    add_threads(parser, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_demo)


def version() -> str:
    """``streamssl X.Y.Z`` from the installed package's metadata."""
    from importlib import metadata

    try:
        return f"streamssl {metadata.version('streamssl')}"
    except metadata.PackageNotFoundError:
        return "streamssl (version unknown: the package is not installed; pip install -e . installs it)"


class _Version(argparse.Action):
    """``--version``: the package metadata is read only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="streamssl", description="Streaming speech transformers and self-supervised speech learning: "
                                      "speech corpora, pretraining, CTC fine-tuning, evaluation, streaming "
                                      "recognition and declared latency. 'streamssl COMMAND --help' says more.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version of streamssl and exit")
    sub = add_subcommands(parser, "command")
    sub.add_parser("latency", arguments=_latency_arguments,
                   help="print the declared latency of an encoder configuration")
    sub.add_parser("demo", arguments=_demo_arguments,
                   help="the README's main job: synthesise speech, pretrain, fine-tune, evaluate a small LLSA "
                        "encoder (CPU, minutes)")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status. Bad input,
    from a flag that does not parse to a file that is not what it should be, is one line on stderr and
    status 2 (1 where a command says so, e.g. files that failed among others)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as error:
        print(f"streamssl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        package = (error.name or "").partition(".")[0]
        if package not in TRAIN_EXTRA_MODULES:
            raise
        print(f"streamssl {args.command}: error: this needs PyTorch and the training packages ({package} is not "
              f"installed): pip install 'streamssl[train]'. Without them, run an export: streamssl stream/serve "
              f"--model FILE.onnx", file=sys.stderr)
        return 2
