"""Streaming evaluation: batched against one stream at a time, and the int8 export's WER change.

    python benchmarks/streaming_eval.py --checkpoint RUN --data SPLIT.jsonl [--limit N]
        [--batch-sizes 1,16] [--decoders greedy,lexicon] [--int8-data SPLIT.jsonl] [--int8-limit N]
    python benchmarks/streaming_eval.py --smoke     # seconds: a tiny model trained 2 steps, 2 tone utterances
        [--serve-clients 16]

Part 1 runs ``evaluate_model(..., streaming=True, chunk_ms=40, batch_size=b)`` for every batch size and
decoder on the first ``--limit`` utterances of ``--data`` and reports wall and process CPU seconds
(one torch thread; CPU time is what the run costs with a core to itself, even on a shared machine),
the speed-up over batch 1, and how many transcripts equal batch 1's. The lexicon decoder's search
graph is built once before the timing.

Part 2 runs the same utterances through the commands a user runs, and counts the transcripts equal to
``evaluate --streaming`` at batch 1 (greedy): ``streamssl stream --json`` on the files, and ``streamssl
serve`` with ``--serve-clients`` websocket clients at once (float32 at 16 kHz, as fast as they can send,
each client taking the next utterance when its last one is done). All of them run the one streaming core.

Part 3 (with ``--int8-data``) exports the checkpoint's streaming step at 40 ms chunks in float32 and in
int8 (``streamssl export --int8``: ONNX Runtime's dynamic weight quantisation), and scores the PyTorch
model and both exports streaming (greedy, batch 16) on that split: WER, CER, and transcripts equal
to PyTorch's. Prints markdown tables; writes ``streaming_eval.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from websockets.asyncio.client import connect

from common import add_common_options, markdown_table, parse_args, trained_tiny_checkpoint, write_json
from streamssl.asr.evaluate import evaluate_model
from streamssl.asr.lexicon import BeamSearchConfig
from streamssl.cli import main as cli
from streamssl.data import load_utterances
from streamssl.export import export_model
from streamssl.runtime.model import OnnxModel
from streamssl.serve import ServeConfig, StreamingServer
from streamssl.streaming import Recognizer
from streamssl.train.checkpoint import load_checkpoint

CHUNK_MS = 40.0


def timed(model, utterances, beam, batch_size: int) -> tuple[list[str], dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate_model(model, utterances, streaming=True, chunk_ms=CHUNK_MS, beam=beam, batch_size=batch_size,
                            device=torch.device("cpu"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    hyps = [h for _, _, h in result.hypotheses]
    return hyps, {"wall_s": round(wall, 1), "cpu_s": round(cpu, 3), "rtf_cpu": round(cpu / result.audio_seconds, 4),
                  "wer": round(result.wer, 4), "cer": round(result.cer, 4)}


def batching(model, utterances, batch_sizes: list[int], decoders: list[str]
             ) -> tuple[list[dict], dict[tuple[str, int], list[str]]]:
    """Part 1: rows of the table, and the transcripts of each (decoder, batch size)."""
    rows, transcripts = [], {}
    for decoder in decoders:
        beam = None if decoder == "greedy" else BeamSearchConfig()
        if beam is not None:
            evaluate_model(model, utterances[:1], streaming=True, chunk_ms=CHUNK_MS, beam=beam, batch_size=1)
        reference, base_cpu = None, None
        for batch_size in batch_sizes:
            hyps, row = timed(model, utterances, beam, batch_size)
            transcripts[decoder, batch_size] = hyps
            reference = reference or hyps
            base_cpu = base_cpu or row["cpu_s"]
            rows.append({"decoder": decoder, "batch_size": batch_size, **row,
                         "speedup_cpu": round(base_cpu / row["cpu_s"], 2),
                         "same_as_first": sum(a == b for a, b in zip(reference, hyps))})
            print(rows[-1], flush=True)
    return rows, transcripts


def stream_command(checkpoint: str, utterances) -> list[str]:
    """Transcripts of ``streamssl stream --json`` over the utterances' files."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["stream", "--checkpoint", str(checkpoint), "--chunk-ms", f"{CHUNK_MS:g}", "--json", "--quiet",
                    *[str(u.audio) for u in utterances]])
    if code != 0:
        raise SystemExit(f"streamssl stream failed with exit status {code}")
    return [f["transcript"] for f in json.loads(out.getvalue())["files"]]


def serve_command(model, utterances, clients: int) -> list[str]:
    """Transcripts from ``streamssl serve``'s server with ``clients`` websocket clients at once."""
    recognizer = Recognizer(model, chunk_ms=CHUNK_MS)
    texts: list[str] = [""] * len(utterances)
    queue = iter(range(len(utterances)))

    async def client(port: int) -> None:
        for index in queue:
            audio, rate = soundfile.read(utterances[index].audio, dtype="float32")
            async with connect(f"ws://127.0.0.1:{port}/asr", max_size=None) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": rate, "format": "float32"}))
                for start in range(0, audio.size, rate // 50):
                    await ws.send(np.ascontiguousarray(audio[start:start + rate // 50]).astype("<f4").tobytes())
                await ws.send(json.dumps({"type": "stop"}))
                async for message in ws:
                    data = json.loads(message)
                    if data["type"] == "done":
                        texts[index] = data["text"]
                    elif data["type"] == "error":
                        raise SystemExit(f"server error on {utterances[index].id}: {data['message']}")

    async def run() -> None:
        async with StreamingServer(recognizer, ServeConfig(max_streams=clients, max_batch=clients), port=0) as server:
            await asyncio.gather(*(client(server.port) for _ in range(clients)))

    asyncio.run(run())
    return texts


def paths(checkpoint: str, model, utterances, clients: int, done: dict[tuple[str, int], list[str]]) -> list[dict]:
    """Part 2: every command's transcripts against ``evaluate --streaming`` at batch 1 (greedy; taken from
    part 1's runs, ``done``, where it made them)."""
    def evaluated(batch_size: int) -> list[str]:
        return done.get(("greedy", batch_size)) or timed(model, utterances, None, batch_size)[0]

    reference = evaluated(1)
    runs = {"evaluate --streaming, batch 1": reference,
            f"evaluate --streaming, batch {clients}": evaluated(clients),
            "stream": stream_command(checkpoint, utterances),
            f"serve, {clients} clients": serve_command(model, utterances, clients)}
    rows = [{"path": name, "utterances": len(hyps), "same_as_evaluate_batch_1": sum(a == b for a, b in zip(reference, hyps))}
            for name, hyps in runs.items()]
    for row in rows:
        print(row, flush=True)
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
    parser.add_argument("--serve-clients", type=int, default=16, help="websocket clients at once in part 2")
    parser.add_argument("--int8-data", help="manifest for the int8 WER comparison (skipped without)")
    parser.add_argument("--int8-limit", type=int, default=None, help="first N utterances of --int8-data")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(limit=2, batch_sizes="1,2", int8_limit=1, serve_clients=2))
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
    rows, transcripts = batching(model, utterances, [int(b) for b in args.batch_sizes.split(",")],
                                 args.decoders.split(","))
    out = {"checkpoint": str(args.checkpoint), "chunk_ms": CHUNK_MS,
           "batching": {"data": args.data, "utterances": len(utterances), "audio_s": round(audio_s, 1),
                        "rows": rows}}
    print(table(out["batching"]["rows"]))
    out["paths"] = {"rows": paths(args.checkpoint, model, utterances, args.serve_clients, transcripts)}
    print(table(out["paths"]["rows"]))
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
