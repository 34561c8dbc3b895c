"""One streaming step, side by side in one run on one thread: torchaudio's Emformer (the peer) against
streamssl ``emformer`` and ``llsa``, in PyTorch and in ONNX Runtime.

Config (issue 14): 12 layers (``--layers``), d_model 256, ffn 1024, 4 heads, left 32, right 4, memory 4,
frame input, chunks of C = 2, 4, 16 frames (20 ms frames: 40, 80, 320 ms). Also: a batch of 32 (``--batch``)
LLSA streams at different positions against batch 1, per stream.

torchaudio cannot be imported against this project's torch, so its ``models/emformer.py`` (which needs
only torch) is loaded on its own from a torchaudio wheel: ``pip download torchaudio --no-deps -d DIR``
and pass ``--torchaudio-wheel DIR/torchaudio-*.whl``. Without it the peer is skipped with a message.
Its code is read from the wheel at run time, never copied into the project.

    python benchmarks/step_speed.py --torchaudio-wheel /tmp/ta/torchaudio-2.9.1-*.whl
    python benchmarks/step_speed.py --smoke     # seconds: one layer, C = 2, batch of 2

Columns ``*_onnx_int8_ms`` run the ``--int8`` export (dynamic int8 weights, ``export._quantize``).
Prints markdown tables (times, ratios to the peer, int8 speed-ups) and the load average at the start;
writes step_speed.json and step_speed.png under ``--out``. Times are CPU
time (``time.process_time``) per step, median over ``--steps`` steps after a warm-up, so other load on
a shared machine does not inflate them.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from common import add_common_options, parse_args
from streamssl import EncoderConfig
from streamssl.asr.ctc import CTCModel
from streamssl.export import export_model
from streamssl.runtime.model import OnnxModel

FRAME_MS = 20.0
D_MODEL, FFN, HEADS, LEFT, RIGHT, MEMORY, INPUT_DIM = 256, 1024, 4, 32, 4, 4, 80


def timed(step, n_steps: int, warmup: int = 5) -> float:
    """Median CPU seconds of ``step()``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n_steps):
        started = time.process_time()
        step()
        times.append(time.process_time() - started)
    return statistics.median(times)


def streamssl_model(mixer: str, chunk: int, layers: int) -> CTCModel:
    torch.manual_seed(0)
    options = {"segment_frames": chunk, "memory_size": MEMORY} if mixer == "emformer" else {}
    config = EncoderConfig(frontend="none", frontend_options={"input_dim": INPUT_DIM}, d_model=D_MODEL,
                           n_layers=layers, n_heads=HEADS,
                           ffn_dim=FFN, dropout=0.0, pos_conv_kernel=8, pos_conv_groups=4, mixer=mixer,
                           left_frames=LEFT, right_frames=RIGHT, mixer_options=options)
    return CTCModel(config).eval()


def torch_step_time(model: CTCModel, chunk: int, n_steps: int) -> float:
    state = model.init_state(1)
    x = torch.randn(1, chunk, INPUT_DIM)

    def step():
        nonlocal state
        with torch.inference_mode():
            _, _, state = model.step_window(x, state)

    return timed(step, n_steps)


def onnx_step_time(model: CTCModel, chunk: int, n_steps: int, int8: bool = False) -> float:
    runtime = OnnxModel(export_model(model, chunk * FRAME_MS, int8=int8)[0], threads=1)
    state = runtime.init_state(1)
    x = np.random.default_rng(0).standard_normal((1, chunk, INPUT_DIM)).astype(np.float32)

    def step():
        nonlocal state
        _, _, state = runtime.step_window(x, state)

    return timed(step, n_steps)


def batch_per_stream_ratio(chunk: int, n_steps: int, layers: int, batch: int = 32) -> tuple[float, float]:
    """CPU time of one step for ``batch`` LLSA streams at different positions, per stream, and of batch 1."""
    model = streamssl_model("llsa", chunk, layers)
    x = torch.randn(1, chunk, INPUT_DIM)
    states = []
    with torch.inference_mode():
        for b in range(batch):
            state = model.init_state(1)
            for _ in range(b % 17):
                _, _, state = model.step_window(x, state)
            states.append(state)
        stacked = model.stack_states(states)
    xb = torch.randn(batch, chunk, INPUT_DIM)

    def step():
        with torch.inference_mode():
            model.step_window(xb, stacked)

    return timed(step, n_steps) / batch, torch_step_time(model, chunk, n_steps)


def load_torchaudio_emformer(wheel: str | None):
    if not wheel:
        return None, "no --torchaudio-wheel given"
    paths = glob.glob(wheel)
    if not paths:
        return None, f"no torchaudio wheel at {wheel}"
    with zipfile.ZipFile(paths[0]) as archive:
        source = archive.read("torchaudio/models/emformer.py")
    folder = tempfile.mkdtemp()
    path = Path(folder) / "emformer.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("torchaudio_emformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Emformer, Path(paths[0]).name


def torchaudio_step_time(emformer_cls, chunk: int, n_steps: int, layers: int) -> float:
    torch.manual_seed(0)
    model = emformer_cls(input_dim=D_MODEL, num_heads=HEADS, ffn_dim=FFN, num_layers=layers, segment_length=chunk,
                         left_context_length=LEFT, right_context_length=RIGHT, max_memory_size=MEMORY).eval()
    x = torch.randn(1, chunk + RIGHT, D_MODEL)
    lengths = torch.tensor([chunk + RIGHT])
    states = None

    def step():
        nonlocal states
        with torch.inference_mode():
            _, _, states = model.infer(x, lengths, states)

    return timed(step, n_steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torchaudio-wheel", help="path (glob) of a torchaudio wheel to read emformer.py from")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chunks", default="2,4,16")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32, help="LLSA streams of the batched step")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(steps=1, chunks="2", layers=1, batch=2))
    torch.set_num_threads(1)
    load = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]] if Path("/proc/loadavg").exists() else None
    emformer_cls, peer = load_torchaudio_emformer(args.torchaudio_wheel)
    if emformer_cls is None:
        print(f"torchaudio Emformer skipped: {peer}", file=sys.stderr)
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        row = {"chunk_frames": chunk, "chunk_ms": chunk * FRAME_MS}
        if emformer_cls is not None:
            row["torchaudio_emformer_ms"] = 1000 * torchaudio_step_time(emformer_cls, chunk, args.steps, args.layers)
        for mixer in ("emformer", "llsa"):
            model = streamssl_model(mixer, chunk, args.layers)
            row[f"{mixer}_torch_ms"] = 1000 * torch_step_time(model, chunk, args.steps)
            row[f"{mixer}_onnx_ms"] = 1000 * onnx_step_time(model, chunk, args.steps)
            row[f"{mixer}_onnx_int8_ms"] = 1000 * onnx_step_time(model, chunk, args.steps, int8=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    per_stream, single = batch_per_stream_ratio(2, args.steps, args.layers, args.batch)
    result = {"config": {"layers": args.layers, "d_model": D_MODEL, "ffn": FFN, "heads": HEADS, "left": LEFT,
                         "right": RIGHT, "memory": MEMORY, "input": "frames", "threads": 1},
              "peer": peer, "rows": rows, "load_average_at_start": load,
              "batched_llsa_c2": {"batch": args.batch, "per_stream_ms": 1000 * per_stream,
                                  "batch1_ms": 1000 * single, "ratio": per_stream / single}}
    columns = [k for k in rows[0] if k.endswith("_ms") and k != "chunk_ms"]
    print("| C (frames) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['chunk_frames']} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    ratio = result["batched_llsa_c2"]
    if emformer_cls is not None:
        print("\nRatios to torchaudio's Emformer step (goals: PyTorch <= 1.0, ONNX Runtime <= 0.3):")
        ratio_columns = [c for c in columns if c != "torchaudio_emformer_ms"]
        print("| C (frames) | " + " | ".join(c[:-3] for c in ratio_columns) + " |")
        print("|---|" + "---|" * len(ratio_columns))
        for row in rows:
            print(f"| {row['chunk_frames']} | "
                  + " | ".join(f"{row[c] / row['torchaudio_emformer_ms']:.2f}x" for c in ratio_columns) + " |")
    print("\nint8 speed-up over float32 ONNX Runtime (goal >= 1.5): " + ", ".join(
        f"{mixer} C={row['chunk_frames']} {row[f'{mixer}_onnx_ms'] / row[f'{mixer}_onnx_int8_ms']:.2f}x"
        for row in rows for mixer in ("emformer", "llsa")))
    print(f"batch {args.batch} at different positions, LLSA C=2: {ratio['per_stream_ms']:.2f} ms per stream vs "
          f"{ratio['batch1_ms']:.2f} ms at batch 1 (ratio {ratio['ratio']:.3f})")
    print(f"load average (1, 5, 15 min) at the start: {load}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for column in columns:
        ax.plot([r["chunk_frames"] for r in rows], [r[column] for r in rows], marker="o", label=column[:-3])
    ax.set_xlabel("chunk C (frames of 20 ms)")
    ax.set_ylabel("CPU ms per step (1 thread)")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_speed.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
