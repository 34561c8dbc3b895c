"""Streaming throughput: real-time factor per chunk size on one CPU thread.

    python benchmarks/streaming_rtf.py [--seconds 10] [--layers 12] [--smoke]

A 12-layer encoder, d_model 256, 4 heads, conv frontend with 256 channels, left 64, right 8 frames,
fed 16 kHz audio chunk by chunk through ``Encoder.step``. RTF = compute time / audio duration
(below 1 keeps up with real time), with compute measured as the process's CPU time so that other jobs on
a shared machine do not inflate it. Prints a markdown table; writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_common_options, markdown_table, parse_args, write_json
from streamssl import Encoder, EncoderConfig

MIXERS = ("maa", "sa", "llsa")
CHUNKS_MS = (20, 40, 80, 160, 320, 640)


def stream_rtf(encoder: Encoder, wave: torch.Tensor, chunk_samples: int, sample_rate: int) -> float:
    state = encoder.init_state(1)
    start = time.process_time()
    with torch.inference_mode():
        for chunk in wave.split(chunk_samples, dim=1):
            _, state = encoder.step(chunk, state)
        encoder.flush(state)
    return (time.process_time() - start) / (wave.shape[1] / sample_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--right-frames", type=int, default=8)
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(seconds=1.0, layers=1))
    torch.set_num_threads(1)
    torch.manual_seed(0)

    results = []
    for mixer in MIXERS:
        config = EncoderConfig(frontend_options={"channels": 256}, d_model=256, n_heads=4, ffn_dim=1024,
                               n_layers=args.layers, mixer=mixer, left_frames=64, right_frames=args.right_frames, dropout=0.0)
        encoder = Encoder(config).eval()
        wave = torch.randn(1, int(args.seconds * config.sample_rate)) * 0.1
        stream_rtf(encoder, wave[:, :16000], 640, config.sample_rate)
        for chunk_ms in CHUNKS_MS:
            rtf = stream_rtf(encoder, wave, chunk_ms * config.sample_rate // 1000, config.sample_rate)
            results.append({"mixer": mixer, "chunk_ms": chunk_ms, "rtf": rtf,
                            "lookahead_ms": encoder.latency().total_lookahead_ms})
            print(results[-1], flush=True)
    write_json(args.out / "streaming_rtf.json", results)

    header = ["mixer", "declared look-ahead"] + [f"{c} ms" for c in CHUNKS_MS]
    rows = []
    for mixer in MIXERS:
        points = [r for r in results if r["mixer"] == mixer]
        rows.append([mixer, f"{points[0]['lookahead_ms']:.0f} ms"] + [f"{p['rtf']:.3f}" for p in points])
    print()
    print(f"Real-time factor, one thread, {args.layers} layers, d_model 256, {args.seconds:.0f} s of audio:")
    print(markdown_table(header, rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mixer in MIXERS:
        points = [r for r in results if r["mixer"] == mixer]
        ax.semilogx([p["chunk_ms"] for p in points], [p["rtf"] for p in points], "o-", label=mixer)
    ax.set_xlabel("chunk (ms)")
    ax.set_ylabel("real-time factor (1 thread)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "streaming_rtf.png", dpi=100)
    print(f"plot: {args.out / 'streaming_rtf.png'}")


if __name__ == "__main__":
    main()
