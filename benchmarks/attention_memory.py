"""Peak memory and time of forward+backward vs sequence length for the attention family.

    python benchmarks/attention_memory.py [--device cuda] [--frames 500 1000 2000 4000 8000] [--smoke]

d_model 256, 4 heads, left 64, right 8, frame input (no frontend), batch 1; one layer and a 6-layer
stack. Points whose dense T x T attention would not fit the memory cap are skipped and say so.
Prints a markdown table, writes attention_memory_<device>.json and a PNG plot under ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import add_common_options, markdown_table, measure_in_subprocess, parse_args, write_json

MIXERS = ("full", "maa", "sa", "llsa")


def dense_estimate_mb(frames: int, layers: int, heads: int = 4) -> float:
    """Rough size of what forward+backward keeps for dense attention: scores, probabilities and mask."""
    return layers * heads * frames * frames * (4 + 4 + 4) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000, 2000, 4000, 8000])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--mixers", nargs="+", choices=MIXERS, default=list(MIXERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-cap-mb", type=float, default=12000)
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(frames=[64], layers=[1], mixers=["sa"]))

    results = []
    for layers in args.layers:
        for frames in args.frames:
            for mixer in args.mixers:
                config = dict(frontend="none", input_dim=80, d_model=256, n_heads=4, ffn_dim=1024, dropout=0.0,
                              n_layers=layers, mixer=mixer, left_frames=64, right_frames=8,
                              pos_conv_kernel=16, pos_conv_groups=16)
                if mixer in ("full", "maa") and dense_estimate_mb(frames, layers) > args.memory_cap_mb:
                    point = {"skipped": f"dense T x T estimated over {args.memory_cap_mb / 1000:.0f} GB"}
                else:
                    point = measure_in_subprocess(config, frames, device=args.device,
                                                  repeats=3 if frames <= 2000 else 1)
                point.update(mixer=mixer, frames=frames, layers=layers)
                results.append(point)
                print(point, flush=True)
    write_json(args.out / f"attention_memory_{args.device}.json", results)

    header = ["layers", "T (frames)"] + [f"{m} MB / s" for m in args.mixers]
    rows = []
    for layers in args.layers:
        for frames in args.frames:
            cells = []
            for mixer in args.mixers:
                p = next(r for r in results if (r["mixer"], r["frames"], r["layers"]) == (mixer, frames, layers))
                cells.append(f"{p['peak_mb']:.0f} / {p['time_s']:.2f}" if "peak_mb" in p
                             else p.get("skipped", p.get("error", "?")))
            rows.append([str(layers), str(frames)] + cells)
    print()
    print(markdown_table(header, rows))
    plot(results, args.layers, args.out / f"attention_memory_{args.device}.png")


def plot(results: list[dict], layer_counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(layer_counts), figsize=(5 * len(layer_counts), 8), squeeze=False)
    for col, layers in enumerate(layer_counts):
        for mixer in MIXERS:
            points = [r for r in results if r["mixer"] == mixer and r["layers"] == layers and "peak_mb" in r]
            if not points:
                continue
            frames = [p["frames"] for p in points]
            axes[0, col].loglog(frames, [max(p["peak_mb"], 1e-1) for p in points], "o-", label=mixer)
            axes[1, col].loglog(frames, [p["time_s"] for p in points], "o-", label=mixer)
        axes[0, col].set_title(f"{layers} layer(s): peak memory of forward+backward")
        axes[0, col].set_ylabel("MB")
        axes[1, col].set_title(f"{layers} layer(s): time of forward+backward")
        axes[1, col].set_ylabel("s")
        for row in range(2):
            axes[row, col].set_xlabel("T (frames)")
            axes[row, col].legend()
            axes[row, col].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
