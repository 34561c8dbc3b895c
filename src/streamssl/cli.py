"""The ``streamssl`` command line; each feature area's subcommands live in :mod:`streamssl.commands`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from streamssl.commands import data, export, serve, stream, train
from streamssl.config import EncoderConfig
from streamssl.demo import run_demo
from streamssl.encoder import declared_latency
from streamssl.mixers import MIXERS
from streamssl.tables import latency_table

# Each provides ``add_commands(subparsers)`` and registers its own subcommands.
COMMAND_MODULES = (data, train, stream, serve, export)


def _left_frames(text: str) -> int | None:
    return None if text.lower() in ("none", "inf", "unlimited") else int(text)


def _right_frames(text: str) -> int | list[int]:
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that describe an :class:`EncoderConfig`: a preset or file, then overrides."""
    group = parser.add_argument_group("encoder configuration")
    group.add_argument("--config", help="an encoder YAML or JSON file of EncoderConfig fields (such as a run "
                                        "folder's encoder.yaml), a run folder, or a pretrain/finetune run "
                                        "config (its encoder: fields over --preset)")
    group.add_argument("--preset", choices=("base", "tiny"), default="base",
                       help="starting configuration: wav2vec 2.0 BASE size, or a tiny test encoder")
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
    base = EncoderConfig.tiny() if preset == "tiny" else EncoderConfig.base()
    return {**base.to_dict(), **encoder}


def encoder_config_from_args(args: argparse.Namespace) -> EncoderConfig:
    if args.config:
        data = encoder_fields_of(args.config, args.preset)
    else:
        data = (EncoderConfig.tiny() if args.preset == "tiny" else EncoderConfig.base()).to_dict()
    for key in ("mixer", "n_layers", "d_model", "n_heads", "right_frames"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    if hasattr(args, "left_frames"):
        data["left_frames"] = args.left_frames
    if args.mixer_option:
        data["mixer_options"] = dict(args.mixer_option)
    return EncoderConfig.from_dict(data)


def cmd_latency(args: argparse.Namespace) -> int:
    config = encoder_config_from_args(args)
    latency = declared_latency(config)
    if args.json:
        print(json.dumps(latency.to_dict(), indent=2))
    else:
        print(latency_table([latency]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamssl", description="Streaming speech transformers and self-supervised speech learning: "
                                      "speech corpora, pretraining, CTC fine-tuning, evaluation, streaming "
                                      "recognition and declared latency. 'streamssl COMMAND --help' says more.")
    sub = parser.add_subparsers(dest="command", required=True)

    latency = sub.add_parser("latency", help="print the declared latency of an encoder configuration")
    add_encoder_arguments(latency)
    latency.add_argument("--json", action="store_true", help="machine-readable output")
    latency.set_defaults(func=cmd_latency)

    demo = sub.add_parser("demo", help="the README's main job: synthesise speech, pretrain, fine-tune, "
                                       "evaluate a small LLSA encoder (CPU, minutes)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"streamssl {args.command}: error: {error}", file=sys.stderr)
        return 2
