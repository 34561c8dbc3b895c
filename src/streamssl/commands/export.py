"""``streamssl export``: a fine-tuned checkpoint's streaming step as ONNX (:mod:`streamssl.export`)."""

from __future__ import annotations

import argparse

from streamssl.commands.common import Subcommands, add_chunk_ms, add_threads, use_threads


def cmd_export(args: argparse.Namespace) -> int:
    from streamssl.export import export_model
    from streamssl.train.checkpoint import load_checkpoint

    use_threads(args.threads)
    model = load_checkpoint(args.checkpoint, kind="finetune").model
    _, info = export_model(model, args.chunk_ms, args.out, int8=args.int8)
    print(f"wrote {args.out}: chunks of {info.chunk_samples} samples ({info.chunk_ms:g} ms), "
          f"{len(info.states)} state tensors, {info.flush_calls} flush call(s), "
          f"declared look-ahead {info.latency['total_lookahead_ms']} ms")
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (file or run folder)")
    add_chunk_ms(parser)
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the weights")
    add_threads(parser)
    parser.set_defaults(func=cmd_export)


def add_commands(sub: Subcommands) -> None:
    sub.add_parser(
        "export", arguments=_arguments, help="export a fine-tuned checkpoint's streaming step to ONNX",
        description="Export the streaming step (samples, samples_count, flush, *state) -> (log_probs, emitted, "
                    "*new_state) of a fine-tuned CTC checkpoint at a fixed chunk size, with every state's name, "
                    "shape, dtype and initial value in the ONNX metadata (layout: docs/streaming.md).")
