"""Activation checkpointing per block: peak memory and time of forward+backward with and without it.

    PYTHONPATH=src python benchmarks/checkpoint_memory.py [--frames 500 1000 2000] [--layers 6] [--smoke]

BASE width (d_model 768, 12 heads, FFN 3072), ``--layers`` blocks, frame input of 512 channels (what the
conv frontend gives; no frontend, so the stack is what is measured), left 64 and right 8 frames, batch 1,
dropout 0.1, one thread; each point in a fresh process (extra peak RSS over the RSS before, CPU time).
Prints a markdown table, writes ``checkpoint_memory.json`` and ``checkpoint_memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import add_common_options, markdown_table, measure_in_subprocess, parse_args, write_json


def config(mixer: str, layers: int, d_model: int) -> dict:
    return dict(frontend="none", frontend_options={"input_dim": 512}, d_model=d_model, n_heads=d_model // 64,
                ffn_dim=4 * d_model, dropout=0.1, n_layers=layers, mixer=mixer, left_frames=64, right_frames=8)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mixer in sorted({p["mixer"] for p in points}):
        for checkpoint, style in ((False, "-"), (True, "--")):
            line = [p for p in points if p["mixer"] == mixer and p["checkpoint"] == checkpoint]
            ax.plot([p["frames"] for p in line], [p["peak_mb"] for p in line], style, marker="o",
                    label=f"{mixer}{' checkpointed' if checkpoint else ''}")
    ax.set(xlabel="T (frames)", ylabel="extra peak RSS (MB)", title="forward+backward, activation checkpointing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--mixers", nargs="+", default=["sa", "llsa"])
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(frames=[64], layers=2, d_model=64, mixers=["sa"]))

    points = []
    for mixer in args.mixers:
        for frames in args.frames:
            for checkpoint in (False, True):
                point = measure_in_subprocess(config(mixer, args.layers, args.d_model), frames, checkpoint=checkpoint)
                points.append({"mixer": mixer, "frames": frames, "checkpoint": checkpoint, **point})
    write_json(args.out / "checkpoint_memory.json", {"layers": args.layers, "d_model": args.d_model, "points": points})
    plot(points, args.out / "checkpoint_memory.png")

    print(f"Forward+backward, {args.layers} x {args.d_model}, batch 1, one thread: extra peak RSS (MB) / CPU s")
    rows = []
    for mixer in args.mixers:
        for frames in args.frames:
            plain, kept = (next(p for p in points if (p["mixer"], p["frames"], p["checkpoint"]) == (mixer, frames, c))
                           for c in (False, True))
            rows.append([mixer, str(frames), f"{plain['peak_mb']:.0f} / {plain['time_s']:.2f}",
                         f"{kept['peak_mb']:.0f} / {kept['time_s']:.2f}", f"{kept['peak_mb'] / plain['peak_mb']:.2f}"])
    print(markdown_table(["mixer", "T (frames)", "plain", "checkpointed", "memory ratio"], rows))


if __name__ == "__main__":
    main()
