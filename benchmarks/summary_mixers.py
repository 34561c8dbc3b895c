"""Time and peak memory of forward+backward vs sequence length: ``summary``, ``wsm``, ``full``, ``sa``.

The timed part is the encoder's block stack (mixer + feed-forward per block, the only part that differs
between mixers) on ``(1, T, 256)`` frames: d_model 256, 4 heads, ffn 1024, left 64, right 8, float32 on
CPU with one thread; one layer and a 6-layer stack. Time is the process's CPU time (the best of
``--repeats`` passes), which on a shared machine is far steadier than wall-clock time. The shared
frontend and positional convolution are left out: on CPU the backward of the 128-tap positional
convolution alone costs about as much as a whole summary block and would blur the comparison. Each point runs in a fresh process so that its peak
resident memory is its own: *peak memory* is the growth of the process's peak RSS over its RSS just
before the measured forward+backward (weights, gradients and a warm-up already in place), with glibc
told to return every block of 64 KiB or more to the system on free, so RSS follows live tensors.
``full`` is skipped where its ``T x T`` score tensors would exceed ``--budget-gb``.

    python benchmarks/summary_mixers.py [--frames 500 1000 ...] [--layers 1 6] [--load FILE] [--smoke]
    # table on stdout; summary_mixers.json and summary_mixers.png under --out (default docs/benchmarks)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from common import add_common_options, parse_args, peak_rss_mb, reset_peak_rss, write_json

MIXERS = ("summary", "wsm", "full", "sa")
FRAMES = (500, 1000, 2000, 4000, 8000, 16000)
LAYERS = (1, 6)
FULL_BYTES_PER_SQUARED_FRAME = 100
"""Rough bytes per ``T^2`` per layer of ``full``'s forward+backward (4 heads of float32 scores, their
softmax and gradients, int64 offsets and boolean masks); only used to skip runs that would not fit."""


def measure_one(mixer: str, n_layers: int, frames: int, repeats: int) -> dict:
    """Run in a child process: build, warm up, then time ``repeats`` forward+backward passes."""
    import torch

    from streamssl import EncoderConfig
    from streamssl.mixers import build_stack

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = EncoderConfig(frontend="none", frontend_options={"input_dim": 80}, d_model=256, n_heads=4,
                           ffn_dim=1024, n_layers=n_layers, dropout=0.0, mixer=mixer, left_frames=64, right_frames=8)
    stack = build_stack(config)

    def forward_backward(x: torch.Tensor) -> None:
        stack(x, torch.tensor([x.shape[1]])).square().mean().backward()

    forward_backward(torch.randn(1, 64, 256, requires_grad=True))
    x = torch.randn(1, frames, 256, requires_grad=True)
    before_mb = reset_peak_rss()
    cpu_seconds, wall_seconds = [], []
    for _ in range(repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        forward_backward(x)
        cpu_seconds.append(time.process_time() - cpu_start)
        wall_seconds.append(time.perf_counter() - wall_start)
    return {"mixer": mixer, "layers": n_layers, "frames": frames, "seconds": min(cpu_seconds),
            "wall_seconds": min(wall_seconds), "peak_mb": max(0.0, peak_rss_mb() - before_mb)}


def run_point(mixer: str, n_layers: int, frames: int, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--one", mixer, str(n_layers), str(frames), "--repeats",
                          str(repeats)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def power_law_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``: 1 for linear growth, 2 for quadratic."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)


def table(results: list[dict]) -> str:
    frame_counts, layer_counts, mixers = grid(results)
    lines = ["| layers | mixer | " + " | ".join(f"T={t}" for t in frame_counts) + " |",
             "|---|---|" + "---|" * len(frame_counts)]
    for n_layers in layer_counts:
        for mixer in mixers:
            cells = []
            for frames in frame_counts:
                row = [r for r in results if (r["mixer"], r["layers"], r["frames"]) == (mixer, n_layers, frames)]
                cells.append(f"{row[0]['seconds'] * 1000:.0f} ms / {row[0]['peak_mb']:.0f} MB" if row else "skipped")
            if any(c != "skipped" for c in cells):
                lines.append(f"| {n_layers} | {mixer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def linearity(results: list[dict]) -> str:
    """Growth of CPU time and memory: ratios from 8000 to 16000 frames and power-law exponents fitted
    over ``T >= 1000`` (at 500 frames fixed costs still show)."""
    lines = ["| layers | mixer | CPU time 16000/8000 | memory 16000/8000 | exponent of CPU time | exponent of memory "
             "| memory per 1000 frames (8000 to 16000) |", "|---|---|---|---|---|---|---|"]
    _, layer_counts, mixers = grid(results)
    for n_layers in layer_counts:
        for mixer in mixers:
            rows = sorted((r for r in results if (r["mixer"], r["layers"]) == (mixer, n_layers)
                           and r["frames"] >= 1000), key=lambda r: r["frames"])
            if len(rows) < 2:
                continue
            by_frames = {r["frames"]: r for r in rows}
            xs = [r["frames"] for r in rows]
            ratios, per_1000 = ["-", "-"], "-"
            if 8000 in by_frames and 16000 in by_frames:
                ratios = [f"{by_frames[16000][key] / by_frames[8000][key]:.2f}" for key in ("seconds", "peak_mb")]
                per_1000 = f"{(by_frames[16000]['peak_mb'] - by_frames[8000]['peak_mb']) / 8:.1f} MB"
            lines.append(f"| {n_layers} | {mixer} | {ratios[0]} | {ratios[1]} "
                         f"| {power_law_exponent(xs, [r['seconds'] for r in rows]):.2f} "
                         f"| {power_law_exponent(xs, [r['peak_mb'] for r in rows]):.2f} | {per_1000} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    _, layer_counts, mixers = grid(results)
    for mixer, color in zip(mixers, ("tab:green", "tab:blue", "tab:red", "tab:orange")):
        for n_layers, style in zip(layer_counts, ("-", "--")):
            rows = sorted((r for r in results if (r["mixer"], r["layers"]) == (mixer, n_layers)),
                          key=lambda r: r["frames"])
            if not rows:
                continue
            xs = [r["frames"] for r in rows]
            label = f"{mixer}, {n_layers} layer{'s' if n_layers > 1 else ''}"
            ax_time.plot(xs, [r["seconds"] for r in rows], style, color=color, marker="o", label=label)
            ax_memory.plot(xs, [r["peak_mb"] for r in rows], style, color=color, marker="o", label=label)
    for ax, ylabel in ((ax_time, "forward+backward CPU time (s)"), (ax_memory, "peak memory growth (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frames T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_memory.legend(fontsize=7)
    fig.suptitle("block stack, d_model 256, 4 heads, left 64, right 8, float32, CPU, 1 thread, batch 1")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("MIXER", "LAYERS", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per point (the least CPU time is kept)")
    parser.add_argument("--budget-gb", type=float, default=3.0, help="skip full where it would need more")
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES))
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    parser.add_argument("--mixers", nargs="+", choices=MIXERS, default=list(MIXERS))
    parser.add_argument("--load", type=Path, help="skip measuring: tabulate and plot the summary_mixers.json given")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(frames=[64], layers=[1], mixers=["wsm"], repeats=1))
    if args.one:
        mixer, n_layers, frames = args.one
        print(json.dumps(measure_one(mixer, int(n_layers), int(frames), args.repeats)))
        return

    results = (json.loads(args.load.read_text()) if args.load
               else measure_all(args.mixers, args.layers, args.frames, args.repeats, args.budget_gb))
    print(table(results))
    print()
    print(linearity(results))
    plot(results, args.out / "summary_mixers.png")
    if not args.load:
        write_json(args.out / "summary_mixers.json", results)
    print(f"\nplot: {args.out / 'summary_mixers.png'}")


def grid(results: list[dict]) -> tuple[list[int], list[int], list[str]]:
    """The frame counts, layer counts and mixers (in the order of :data:`MIXERS`) that ``results`` cover."""
    present = {r["mixer"] for r in results}
    return (sorted({r["frames"] for r in results}), sorted({r["layers"] for r in results}),
            [m for m in MIXERS if m in present])


def measure_all(mixers: list[str], layer_counts: list[int], frame_counts: list[int], repeats: int,
                budget_gb: float) -> list[dict]:
    results = []
    for n_layers in layer_counts:
        for mixer in mixers:
            for frames in frame_counts:
                if mixer == "full" and FULL_BYTES_PER_SQUARED_FRAME * frames**2 * n_layers > budget_gb * 2**30:
                    continue
                result = run_point(mixer, n_layers, frames, repeats)
                print(f"{mixer:8s} layers={n_layers} T={frames:6d}  {result['seconds'] * 1000:9.1f} ms  "
                      f"{result['peak_mb']:8.1f} MB", file=sys.stderr, flush=True)
                results.append(result)
    return results


if __name__ == "__main__":
    main()
