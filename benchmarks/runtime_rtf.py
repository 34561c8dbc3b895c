"""Torch-free runtime against the eager PyTorch recogniser: real-time factor of one stream, log-mel included.

    python benchmarks/runtime_rtf.py [--checkpoint runs/demo/finetune] [--seconds 20] [--chunks-ms 40 80 160] [--smoke]

The model is the demo's (``--checkpoint``), or without one the demo's configuration (``finetune --preset
cpu-small``: a 4 x 144 LLSA encoder on the fbank frontend) untrained: speed does not depend on the weights.
Its streaming step is exported at each chunk size (``streamssl export``, float32) and the same audio (noise
with a speech-like level) goes through :class:`~streamssl.streaming.Recognizer` chunk by chunk, as ``streamssl
stream`` feeds it, batch 1, greedy CTC, on one thread: once with the export in ONNX Runtime
(:class:`~streamssl.runtime.OnnxModel`, what ``stream --model`` runs; log-mel by kaldi-native-fbank on the
host), once with the PyTorch model. RTF = process CPU time / audio time (CPU time, so that other jobs on a
shared machine do not inflate it; wall time beside it). For the runtime, the time per chunk is split into the
host log-mel, the ONNX Runtime call and the rest (the streaming core and the decoder), timed inside the
fastest run itself. The int8 export (``export --int8``) runs beside them (RTF only). The float32 runtime
and the eager model give the same transcript, which the table checks. Writes ``runtime_rtf.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import add_common_options, markdown_table, parse_args, write_json
from streamssl.export import export_model
from streamssl.runtime.model import OnnxModel
from streamssl.streaming.recognizer import Recognizer


def demo_model(checkpoint: str | None):
    """The demo's fine-tuned model, or its configuration untrained."""
    from streamssl.train.checkpoint import build_model, load_checkpoint
    from streamssl.train.config import preset

    if checkpoint is not None:
        return load_checkpoint(checkpoint, kind="finetune").model.eval()
    torch.manual_seed(0)
    config = preset("finetune", "cpu-small")
    return build_model("finetune", config, config.encoder).eval()


class PartClock:
    """Process CPU time spent inside the host log-mel (``OnnxModel._inputs_of``) and the ONNX Runtime call
    (``OnnxModel._run``) of ``model`` while it is installed, so that a timed run splits itself: the streaming
    core's and decoder's share is that run's time less these two."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.seconds = {"log_mel": 0.0, "onnx_run": 0.0}

    def _timed(self, name: str, function):
        def timed(*args):
            began = time.process_time()
            try:
                return function(*args)
            finally:
                self.seconds[name] += time.process_time() - began
        return timed

    def __enter__(self) -> "PartClock":
        self.model._inputs_of = self._timed("log_mel", self.model._inputs_of)
        self.model._run = self._timed("onnx_run", self.model._run)
        return self

    def __exit__(self, *exc) -> None:
        del self.model._inputs_of, self.model._run


def run_stream(recognizer: Recognizer, audio: np.ndarray, chunk: int) -> tuple[str, float, float, dict[str, float]]:
    """Transcript, CPU seconds and wall seconds of streaming ``audio`` in chunks of ``chunk`` samples, and for
    an ONNX model the CPU seconds of its log-mel and ONNX Runtime parts in that same run."""
    clock = PartClock(recognizer.model) if isinstance(recognizer.model, OnnxModel) else None
    with clock if clock is not None else contextlib.nullcontext():
        stream = recognizer.stream()
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, audio.size, chunk):
            stream.accept(audio[start:start + chunk])
        text = stream.finish().text
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return text, cpu, wall, dict(clock.seconds) if clock is not None else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="fine-tuned checkpoint (default: the demo's configuration, untrained)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--chunks-ms", type=float, nargs="+", default=[40.0, 80.0, 160.0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; the fastest counts")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(seconds=1.0, chunks_ms=[40.0], repeats=1))
    torch.set_num_threads(1)
    model = demo_model(args.checkpoint)
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(int(args.seconds * model.sample_rate))).astype(np.float32)
    load = os.getloadavg()[0]

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for chunk_ms in args.chunks_ms:
            path = Path(folder) / f"model_{chunk_ms:g}.onnx"
            export_model(model, chunk_ms, path)
            export_model(model, chunk_ms, path.with_suffix(".int8.onnx"), int8=True)
            recognizers = {"runtime": Recognizer(OnnxModel(path, threads=1), chunk_ms=chunk_ms),
                           "runtime_int8": Recognizer(OnnxModel(path.with_suffix(".int8.onnx"), threads=1),
                                                      chunk_ms=chunk_ms),
                           "eager": Recognizer(model, chunk_ms=chunk_ms)}
            chunk = recognizers["runtime"].chunk_samples
            for recognizer in recognizers.values():
                run_stream(recognizer, audio[:chunk * 10], chunk)
            measured = {}
            for name, recognizer in recognizers.items():
                runs = [run_stream(recognizer, audio, chunk) for _ in range(args.repeats)]
                fastest = min(runs, key=lambda run: run[1])
                measured[name] = {"text": runs[0][0], "rtf_cpu": fastest[1] / args.seconds,
                                  "rtf_wall": min(wall for _, _, wall, _ in runs) / args.seconds,
                                  "parts_s": fastest[3]}
            chunks = -(-audio.size // chunk)
            parts = {f"{part}_us": 1e6 * seconds / chunks for part, seconds in measured["runtime"]["parts_s"].items()}
            chunk_us = 1e6 * measured["runtime"]["rtf_cpu"] * args.seconds / chunks
            row = {"chunk_ms": chunk_ms, "runtime_rtf_cpu": measured["runtime"]["rtf_cpu"],
                   "runtime_rtf_wall": measured["runtime"]["rtf_wall"], "eager_rtf_cpu": measured["eager"]["rtf_cpu"],
                   "eager_rtf_wall": measured["eager"]["rtf_wall"],
                   "runtime_int8_rtf_cpu": measured["runtime_int8"]["rtf_cpu"],
                   "runtime_chunk_us": chunk_us, **parts,
                   "core_and_decoder_us": chunk_us - parts["log_mel_us"] - parts["onnx_run_us"],
                   "same_transcript": measured["runtime"]["text"] == measured["eager"]["text"]}
            rows.append(row)
            print(row, flush=True)
    write_json(args.out / "runtime_rtf.json", {
        "model": args.checkpoint or "finetune --preset cpu-small (untrained)", "seconds": args.seconds,
        "threads": 1, "load_average_1min": load, "repeats": args.repeats, "rows": rows})

    header = ["chunk", "runtime RTF (CPU)", "runtime int8 RTF (CPU)", "eager RTF (CPU)", "runtime / eager", "runtime per chunk",
              "log-mel", "ONNX Runtime", "core + decoder", "same transcript"]
    table = [[f"{r['chunk_ms']:g} ms", f"{r['runtime_rtf_cpu']:.4f}", f"{r['runtime_int8_rtf_cpu']:.4f}",
              f"{r['eager_rtf_cpu']:.4f}",
              f"{r['runtime_rtf_cpu'] / r['eager_rtf_cpu']:.2f}", f"{r['runtime_chunk_us']:.0f} us",
              f"{r['log_mel_us']:.0f} us", f"{r['onnx_run_us']:.0f} us", f"{r['core_and_decoder_us']:.0f} us",
              "yes" if r["same_transcript"] else "NO"] for r in rows]
    print()
    print(f"One stream, batch 1, greedy, one thread, {args.seconds:g} s of audio, log-mel included "
          f"(load average {load:.1f}):")
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
