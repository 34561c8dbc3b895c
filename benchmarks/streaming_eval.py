"""Streaming evaluation: batched against one stream at a time, and the int8 export's WER change.

    python benchmarks/streaming_eval.py --checkpoint RUN --data SPLIT.jsonl [--limit N]
        [--batch-sizes 1,16] [--decoders greedy,lexicon] [--int8-data SPLIT.jsonl] [--int8-limit N]
    python benchmarks/streaming_eval.py --smoke     # seconds: a tiny model trained 2 steps, 2 tone utterances

Part 1 runs ``evaluate_model(..., streaming=True, chunk_ms=40, batch_size=b)`` for every batch size and
decoder on the first ``--limit`` utterances of ``--data`` and reports wall and process CPU seconds
(one torch thread; CPU time is what the run costs with a core to itself, even on a shared machine),
the speed-up over batch 1, and how many transcripts equal batch 1's. The lexicon decoder's search
graph is built once before the timing.

Part 2 (with ``--int8-data``) exports the checkpoint's streaming step at 40 ms chunks in float32 and in
int8 (``streamssl export --int8``: ONNX Runtime's dynamic weight quantisation), and scores the PyTorch
model and both exports streaming (greedy, batch 16) on that split: WER, CER, and transcripts equal
to PyTorch's. Prints markdown tables; writes ``streaming_eval.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import add_common_options, markdown_table, parse_args, trained_tiny_checkpoint, write_json
from streamssl.asr.evaluate import evaluate_model
from streamssl.asr.lexicon import BeamSearchConfig
from streamssl.data import load_utterances
from streamssl.export import OnnxModel, export_model
from streamssl.train.checkpoint import load_checkpoint

CHUNK_MS = 40.0


def timed(model, utterances, beam, batch_size: int) -> tuple[list[str], dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate_model(model, utterances, streaming=True, chunk_ms=CHUNK_MS, beam=beam, batch_size=batch_size,
                            device=torch.device("cpu"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    hyps = [h for _, _, h in result.hypotheses]
    return hyps, {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rtf_cpu": round(cpu / result.audio_seconds, 4),
                  "wer": round(result.wer, 4), "cer": round(result.cer, 4)}


def batching(model, utterances, batch_sizes: list[int], decoders: list[str]) -> list[dict]:
    rows = []
    for decoder in decoders:
        beam = None if decoder == "greedy" else BeamSearchConfig()
        if beam is not None:
            evaluate_model(model, utterances[:1], streaming=True, chunk_ms=CHUNK_MS, beam=beam, batch_size=1)
        reference, base_cpu = None, None
        for batch_size in batch_sizes:
            hyps, row = timed(model, utterances, beam, batch_size)
            reference = reference or hyps
            base_cpu = base_cpu or row["cpu_s"]
            rows.append({"decoder": decoder, "batch_size": batch_size, **row,
                         "speedup_cpu": round(base_cpu / row["cpu_s"], 2),
                         "same_as_first": sum(a == b for a, b in zip(reference, hyps))})
            print(rows[-1], flush=True)
    return rows


def int8_change(model, utterances) -> list[dict]:
    runs = {"pytorch": model}
    for int8 in (False, True):
        data, _ = export_model(model, CHUNK_MS, int8=int8)
        runs[f"onnx {'int8' if int8 else 'float32'} ({len(data) / 1e6:.1f} MB)"] = OnnxModel(data)
    rows, reference = [], None
    for name, runner in runs.items():
        hyps, row = timed(runner, utterances, None, 16)
        reference = reference or hyps
        rows.append({"model": name, **row, "same_as_pytorch": sum(a == b for a, b in zip(reference, hyps))})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(list(rows[0]), [list(row.values()) for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="fine-tuned checkpoint (file or run folder); required without --smoke")
    parser.add_argument("--data", help="manifest for the batching comparison; required without --smoke")
    parser.add_argument("--limit", type=int, default=None, help="first N utterances of --data")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--decoders", default="greedy,lexicon")
    parser.add_argument("--int8-data", help="manifest for the int8 WER comparison (skipped without)")
    parser.add_argument("--int8-limit", type=int, default=None, help="first N utterances of --int8-data")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(limit=2, batch_sizes="1,2", int8_limit=1))
    if args.smoke and not (args.checkpoint or args.data):
        scratch = tempfile.TemporaryDirectory(prefix="streamssl-bench-")  # the tiny model and its corpus
        args.checkpoint = trained_tiny_checkpoint(Path(scratch.name), steps=2)
        args.data = args.int8_data = str(args.checkpoint.parent / "corpus" / "manifest.jsonl")
    if not (args.checkpoint and args.data):
        parser.error("--checkpoint and --data are required (or --smoke)")
    torch.set_num_threads(1)
    model = load_checkpoint(args.checkpoint, kind="finetune").model.eval()
    utterances = load_utterances(args.data)[:args.limit]
    audio_s = sum(u.duration for u in utterances)
    print(f"batching: {len(utterances)} utterances, {audio_s:.1f} s of audio", flush=True)
    out = {"checkpoint": str(args.checkpoint), "chunk_ms": CHUNK_MS,
           "batching": {"data": args.data, "utterances": len(utterances), "audio_s": round(audio_s, 1),
                        "rows": batching(model, utterances, [int(b) for b in args.batch_sizes.split(",")],
                                         args.decoders.split(","))}}
    print(table(out["batching"]["rows"]))
    if args.int8_data:
        split = load_utterances(args.int8_data)[:args.int8_limit]
        split_s = sum(u.duration for u in split)
        print(f"int8: {len(split)} utterances, {split_s:.1f} s of audio", flush=True)
        out["int8"] = {"data": args.int8_data, "utterances": len(split), "audio_s": round(split_s, 1),
                       "rows": int8_change(model, split)}
        print(table(out["int8"]["rows"]))
    write_json(args.out / "streaming_eval.json", out)


if __name__ == "__main__":
    main()
