"""Augmented-memory mixers (AM-TRF, Emformer) against SA and LLSA at equal worst-case look-ahead, on CPU.

    PYTHONPATH=src python benchmarks/memory_mixers.py [--frames 500 1000 2000 4000] [--out docs/benchmarks] [--smoke]

Three measurements, one thread, d_model 256, 4 heads, ffn 1024, 4 layers, frame input (no frontend):

1. Training throughput: forward+backward frames per second on a batch of 2 x 1000 frames (``--train-frames``).
   ``amtrf``/``emformer`` use C=16, R=4, L=32, M=4 (worst look-ahead C-1+R = 19 frames, mean 11.5);
   ``sa`` spreads 19 frames of look-ahead over its layers (5+5+5+4, it compounds), ``llsa`` has R=19.
2. Streaming cost per segment: one stream fed one segment (C frames) per step, C in {4, 8, 16, 32},
   milliseconds per step at steady state (median of 40 steps after 8, ``--stream-steps``) and the
   real-time factor at 20 ms frames.
3. Peak memory vs T: extra resident memory (peak RSS minus RSS before) of one forward+backward,
   each point in a fresh process so earlier peaks cannot hide later ones.

Prints markdown tables, writes ``memory_mixers.json`` and ``memory_mixers.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import add_common_options, markdown_table, measure_in_subprocess, parse_args, write_json
from streamssl import Encoder, EncoderConfig

N_LAYERS, SEGMENT, RIGHT, LEFT, MEMORY = 4, 16, 4, 32, 4
LATENCY_FRAMES = SEGMENT - 1 + RIGHT
FRAME_MS = 20.0


def config(mixer: str, segment: int = SEGMENT) -> EncoderConfig:
    """The benchmark encoder for ``mixer`` at a worst-case look-ahead of ``segment - 1 + RIGHT`` frames."""
    latency = segment - 1 + RIGHT
    options, right = {}, RIGHT
    if mixer in ("amtrf", "emformer"):
        options = {"segment_frames": segment, "memory_size": MEMORY}
    elif mixer == "sa":
        right = [latency // N_LAYERS + (layer < latency % N_LAYERS) for layer in range(N_LAYERS)]
    elif mixer == "llsa":
        right = latency
    return EncoderConfig(frontend="none", frontend_options={"input_dim": 80}, d_model=256, n_heads=4,
                         ffn_dim=1024, dropout=0.0, n_layers=N_LAYERS, mixer=mixer, left_frames=LEFT, right_frames=right,
                         pos_conv_kernel=16, pos_conv_groups=16, mixer_options=options)


def train_step(encoder: Encoder, x: torch.Tensor) -> None:
    y, _ = encoder(x)
    y.pow(2).mean().backward()


def throughput(mixer: str, batch: int = 2, frames: int = 1000, repeats: int = 3) -> dict:
    """Forward+backward frames per second (median of ``repeats`` after one warm-up)."""
    torch.manual_seed(0)
    encoder = Encoder(config(mixer)).train()
    x = torch.randn(batch, frames, 80)
    train_step(encoder, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_step(encoder, x)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    latency = encoder.latency()
    return {"mixer": mixer, "frames_per_s": batch * frames / seconds, "step_s": seconds,
            "lookahead_frames": latency.encoder_lookahead_frames,
            "mean_lookahead_frames": latency.encoder_mean_lookahead_frames}


def streaming_cost(mixer: str, segment: int, segments: int = 40, warmup: int = 8) -> dict:
    """Milliseconds per step when one stream is fed one segment (``segment`` frames) per step."""
    torch.manual_seed(0)
    encoder = Encoder(config(mixer, segment)).eval()
    x = torch.randn(1, (segments + warmup) * segment, 80)
    state = encoder.init_state(1)
    times = []
    with torch.no_grad():
        for i in range(segments + warmup):
            start = time.perf_counter()
            _, state = encoder.step(x[:, i * segment:(i + 1) * segment], state)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times)
    return {"mixer": mixer, "segment_frames": segment, "ms_per_segment": ms,
            "rtf": ms / (segment * FRAME_MS), "lookahead_frames": encoder.latency().encoder_lookahead_frames}


def peak_memory(mixer: str, frames: int) -> dict:
    """Extra peak RSS and time of one forward+backward over ``frames`` frames, in a fresh process."""
    point = measure_in_subprocess(config(mixer).to_dict(), frames, threads=1)
    return {"mixer": mixer, "frames": frames, **point}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mixer in sorted({p["mixer"] for p in results["memory"]}):
        points = [p for p in results["memory"] if p["mixer"] == mixer]
        left.plot([p["frames"] for p in points], [p["peak_mb"] for p in points], marker="o", label=mixer)
    left.set(xlabel="T (frames)", ylabel="extra peak RSS (MB)", title="forward+backward peak memory")
    left.legend()
    for mixer in sorted({p["mixer"] for p in results["streaming"]}):
        points = [p for p in results["streaming"] if p["mixer"] == mixer]
        right.plot([p["segment_frames"] for p in points], [p["rtf"] for p in points], marker="o", label=mixer)
    segments = sorted({p["segment_frames"] for p in results["streaming"]})
    right.set(xlabel="segment C (frames)", ylabel="real-time factor (compute / audio)",
              title="streaming, one segment per step", xticks=segments)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--segments", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--train-frames", type=int, default=1000, help="frames per utterance of the throughput batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed throughput steps per mixer (median)")
    parser.add_argument("--memory-mixers", nargs="+", default=["amtrf", "emformer", "sa"],
                        help="mixers of the peak-memory part (one fresh process per point)")
    parser.add_argument("--stream-steps", type=int, default=40, help="timed streaming steps per point (median)")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(frames=[64], segments=[4], train_frames=64, repeats=1, stream_steps=2,
                                         memory_mixers=["emformer"]))
    torch.set_num_threads(1)

    results = {"training": [throughput(m, frames=args.train_frames, repeats=args.repeats)
                            for m in ("amtrf", "emformer", "sa", "llsa")],
               "streaming": [streaming_cost(m, c, segments=args.stream_steps)
                             for m in ("amtrf", "emformer") for c in args.segments],
               "memory": [peak_memory(m, t) for m in args.memory_mixers for t in args.frames]}
    write_json(args.out / "memory_mixers.json", results)
    plot(results, args.out / "memory_mixers.png")

    print(f"Training throughput, forward+backward, 2 x {args.train_frames} frames, {N_LAYERS} layers, one thread")
    print(markdown_table(["mixer", "look-ahead worst / mean (frames)", "frames/s", "s per step"],
                [[p["mixer"], f"{p['lookahead_frames']} / {p['mean_lookahead_frames']:g}",
                  f"{p['frames_per_s']:.0f}", f"{p['step_s']:.2f}"] for p in results["training"]]))
    print("\nStreaming cost per segment (one stream, one segment per step, no_grad)")
    rows = []
    for c in args.segments:
        row = [str(c), str(c - 1 + RIGHT)]
        for mixer in ("amtrf", "emformer"):
            p = next(p for p in results["streaming"] if (p["mixer"], p["segment_frames"]) == (mixer, c))
            row.append(f"{p['ms_per_segment']:.2f} ms (RTF {p['rtf']:.3f})")
        rows.append(row)
    print(markdown_table(["C", "worst look-ahead (frames)", "amtrf", "emformer"], rows))
    print("\nPeak memory (extra RSS, MB) / time (s) of one forward+backward, batch 1")
    rows = []
    for t in args.frames:
        row = [str(t)]
        for mixer in args.memory_mixers:
            p = next(p for p in results["memory"] if (p["mixer"], p["frames"]) == (mixer, t))
            row.append(f"{p['peak_mb']:.0f} / {p['time_s']:.2f}")
        rows.append(row)
    print(markdown_table(["T (frames)", *args.memory_mixers], rows))


if __name__ == "__main__":
    main()
