"""Emission delay and real-time factor of the streaming recogniser across mixers and chunk sizes.

    python benchmarks/emission_delay.py [--seconds 8] [--chunks-ms 20 40 80 160 320 640] [--clocks wall cpu] [--smoke]

Model: a CTC model (linear head) on a 12-layer encoder, d_model 256, 4 heads, FFN 1024, conv frontend
with 256 channels, left 64 / right 8 frames, random weights, eval mode, one CPU thread, batch of one.
Audio: deterministic noise (the content does not change the compute of these models).

Method. Each point builds a :class:`~streamssl.streaming.Recognizer` with ``chunk_ms`` and feeds the audio in
chunks of that size at real-time pace: chunk ``k`` is fed when audio second ``(k+1) * chunk`` has
arrived. The pace is simulated (:class:`~streamssl.streaming.pacing.PacedClock` moves its clock
forward instead of sleeping) on two clocks: ``wall`` (compute takes its wall time, including time lost
to other jobs on a shared machine) and ``cpu`` (compute takes the process's CPU time: a core of one's
own); ``--clocks real`` sleeps instead. With
random weights there are no meaningful tokens, so every output frame is counted as a token: its
emission delay is the clock reading after the model call that produced it minus the reading when the
chunk holding the last sample of its 25 ms window was fed (docs/methods.md 5.3). Frames released by the
end-of-stream flush are left out (no look-ahead left to wait for). Per-chunk compute is the wall time
of each model call; RTF is their sum over the audio duration. The machine these numbers come from is
shared, so each point also gives its CPU-time RTF (process CPU time during the model calls over the
audio duration: what the calls cost with a core to themselves) and the 1-minute load average.
Declared latency is the model's look-ahead (frontend + encoder) plus one chunk of wait.

Prints a markdown table; writes JSON and a PNG plot to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import add_common_options, markdown_table, parse_args, write_json
from streamssl.asr.ctc import CTCModel
from streamssl.config import EncoderConfig
from streamssl.mixers import MIXERS
from streamssl.streaming.pacing import PacedClock
from streamssl.streaming.recognizer import Recognizer

BENCH_MIXERS = ("sa", "llsa", "amtrf", "emformer", "wsm")
CHUNKS_MS = (20, 40, 80, 160, 320, 640)
MIXER_OPTIONS = {"wsm": {"summary": "causal"}}


def build_model(mixer: str, layers: int) -> CTCModel:
    torch.manual_seed(0)
    config = EncoderConfig(frontend_options={"channels": 256}, d_model=256, n_layers=layers, n_heads=4,
                           ffn_dim=1024, dropout=0.0, mixer=mixer, left_frames=64, right_frames=8,
                           mixer_options=MIXER_OPTIONS.get(mixer, {}))
    return CTCModel(config).eval()


def run_point(model: CTCModel, wave: torch.Tensor, chunk_ms: float, clock_kind: str) -> dict:
    clock = PacedClock(simulate=clock_kind != "real", cpu_time=clock_kind == "cpu")
    recognizer = Recognizer(model, chunk_ms=chunk_ms, clock=clock.now)
    chunk = recognizer.chunk_samples
    stream = recognizer.stream()
    clock.start()
    for k, piece in enumerate(wave.split(chunk)):
        clock.wait_until((k * chunk + piece.numel()) / recognizer.sample_rate)
        stream.accept(piece)
    frames_streamed = stream.frames_out
    stream.finish()
    delays_ms = 1000 * np.array(stream.frame_delays_s[:frames_streamed])
    compute_ms = 1000 * np.array(stream.compute_s)
    cpu_ms = 1000 * np.array(stream.cpu_s)
    latency = model.latency()
    audio_s = wave.numel() / recognizer.sample_rate
    return {"chunk_ms": chunk_ms, "declared_ms": latency.total_lookahead_ms + chunk_ms,
            "lookahead_ms": latency.total_lookahead_ms,
            "delay_mean_ms": float(delays_ms.mean()), "delay_p95_ms": float(np.percentile(delays_ms, 95)),
            "compute_mean_ms": float(compute_ms.mean()), "compute_p95_ms": float(np.percentile(compute_ms, 95)),
            "rtf": float(compute_ms.sum() / 1000 / audio_s), "rtf_cpu": float(cpu_ms.sum() / 1000 / audio_s),
            "frames": int(frames_streamed),
            "clock": clock_kind}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_delay, ax_rtf) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"wall": "-", "real": "-", "cpu": "--"}
    for mixer in dict.fromkeys(r["mixer"] for r in results):
        color = None
        for clock_kind in dict.fromkeys(r["clock"] for r in results):
            points = [r for r in results if r["mixer"] == mixer and r["clock"] == clock_kind]
            chunks = [r["chunk_ms"] for r in points]
            line, = ax_delay.plot(chunks, [r["delay_mean_ms"] for r in points], marker="o", color=color,
                                  linestyle=styles[clock_kind], label=f"{mixer} ({clock_kind} clock)")
            color = line.get_color()
        ax_delay.plot(chunks, [r["declared_ms"] for r in points], linestyle=":", color=color,
                      label=f"{mixer} declared")
        # Every clock's run measures the same compute; the plot shows the first clock's.
        points = [r for r in results if r["mixer"] == mixer and r["clock"] == results[0]["clock"]]
        ax_rtf.plot(chunks, [r["rtf"] for r in points], marker="o", color=color, label=f"{mixer} wall")
        ax_rtf.plot(chunks, [r["rtf_cpu"] for r in points], marker="x", linestyle="--", color=color,
                    label=f"{mixer} CPU time")
    ax_delay.set(xscale="log", yscale="log", xlabel="chunk (ms)", ylabel="mean emission delay (ms, log)",
                 title="emission delay vs declared latency")
    ax_rtf.axhline(0.1, color="grey", linestyle="--", linewidth=1)
    ax_rtf.set(xscale="log", yscale="log", xlabel="chunk (ms)", ylabel="real-time factor",
               title="RTF, 1 CPU thread")
    chunk_ticks = sorted({r["chunk_ms"] for r in results})
    for ax in (ax_delay, ax_rtf):
        ax.set_xticks(chunk_ticks, [f"{c:g}" for c in chunk_ticks], minor=False)
        ax.set_xticks([], minor=True)
    ax_delay.legend(fontsize=7, ncol=2)
    ax_rtf.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=[m for m in BENCH_MIXERS if m in MIXERS])
    parser.add_argument("--chunks-ms", type=float, nargs="+", default=list(CHUNKS_MS))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--clocks", nargs="+", choices=("wall", "cpu", "real"), default=["wall", "cpu"],
                        help="wall: simulated pace on wall time; cpu: simulated pace on process CPU time; "
                             "real: sleep between chunks")
    parser.add_argument("--name", default="emission_delay")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(mixers=["llsa", "emformer"], chunks_ms=[40.0], seconds=1.0, layers=1))

    torch.set_num_threads(1)
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, int(args.seconds * 16000)).astype(np.float32))
    results = []
    for mixer in args.mixers:
        model = build_model(mixer, args.layers)
        warm_up = Recognizer(model, chunk_ms=40).stream()  # allocator and kernels, not measured
        warm_up.accept(wave[:16000])
        warm_up.finish()
        for chunk_ms in args.chunks_ms:
            for clock_kind in args.clocks:
                load_before = os.getloadavg()[0]
                point = run_point(model, wave, chunk_ms, clock_kind)
                point.update(mixer=mixer, load_1min=round((load_before + os.getloadavg()[0]) / 2, 2))
                results.append(point)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()}, flush=True)

    meta = {"seconds": args.seconds, "layers": args.layers, "threads": 1, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M")}
    write_json(args.out / f"{args.name}.json", {"meta": meta, "results": results})
    plot(results, args.out / f"{args.name}.png")
    header = ["mixer", "clock", "chunk ms", "declared ms", "delay mean ms", "delay p95 ms", "mean - declared ms",
              "compute/chunk mean ms", "p95 ms", "RTF (wall)", "RTF (CPU time)", "load"]
    rows = [[r["mixer"], r["clock"], f"{r['chunk_ms']:g}", f"{r['declared_ms']:.0f}", f"{r['delay_mean_ms']:.0f}",
             f"{r['delay_p95_ms']:.0f}", f"{r['delay_mean_ms'] - r['declared_ms']:+.0f}",
             f"{r['compute_mean_ms']:.1f}", f"{r['compute_p95_ms']:.1f}", f"{r['rtf']:.3f}", f"{r['rtf_cpu']:.3f}",
             f"{r['load_1min']:.1f}"]
            for r in results]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
