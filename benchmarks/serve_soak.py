"""Soak test of ``streamssl serve``: real-time streams for many minutes, clients reconnecting with new utterances.

    python benchmarks/serve_soak.py [--minutes 30] [--streams 16] [--checkpoint DIR] [--backend torch|onnx]
        [--corpus test.jsonl | --audio tones] [--sample-s 30] [--smoke]

Model and audio as in ``serve_load.py``: ``runs/demo/finetune`` (or ``--checkpoint``, or a tiny tone model
trained here), served in its own process exactly as ``streamssl serve`` does (one torch thread, default
batching and endpointing, ``max_streams`` = ``--streams``). Audio: the utterances of the demo's test split
(``--corpus``; synthesised with ``streamssl corpus synth`` when absent), or with ``--audio tones`` runs of
tone words. ``--smoke``: the tiny model trained for 2 steps, tones, 2 streams for 6 s.

Method. ``--streams`` clients run side by side for ``--minutes``. Each streams one utterance as PCM16 in
40 ms messages at real-time pace, sends the stop message, waits for ``done``, disconnects, and at once
connects again with the next utterance (client ``i`` walks the utterances from its own starting point), so
the server sees a new session every few seconds per stream for the whole run. Every ``--sample-s`` the
server's resident set size (``/proc/PID/statm``) and CPU time are read.

Measured: the server's RSS over time (its growth from the first sample after the first minute, when what is
made once is made, to the last, and its least-squares slope over that stretch, MB per hour); per session,
the transcript against offline decoding of the same utterance: sessions equal, words lost (offline words
missing from the transcript, by a longest-matching-blocks alignment) and words added; client-side word
emission delay p50/p95; the server's cores used; the 1-minute load average (the machine may be shared).

Prints markdown tables; writes JSON and a PNG plot of RSS over time to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, add_common_options, markdown_table, parse_args, trained_tiny_checkpoint, write_json
from serve_load import (
    RATE,
    client_audio,
    offline_transcripts,
    pcm16_quantised,
    process_cpu_s,
    run_client,
    speech_corpus,
    start_server,
)

WARM_UP_S = 60.0


def utterance_pool(audio: str, corpus: Path, scratch: Path, smoke: bool) -> tuple[list[np.ndarray], str]:
    """Every utterance of the corpus (PCM16-quantised) or, for tones, 16 tone runs of about 4 s."""
    if audio == "tones":
        return [client_audio(i, 1.0 if smoke else 4.0) for i in range(16)], "tone speech"
    from streamssl.data import load_utterances
    from streamssl.data.audio import load_audio

    manifest = speech_corpus(corpus, scratch)
    pool = [pcm16_quantised(np.concatenate([load_audio(u.audio, RATE), np.zeros(int(0.3 * RATE), np.float32)]))
            for u in load_utterances(manifest)]
    return pool, f"speech of {manifest}"


def server_rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def word_errors(expected: str, got: str | None) -> tuple[int, int]:
    """(offline words missing from ``got``, words of ``got`` not in the offline transcript), aligned in order."""
    reference, hypothesis = expected.split(), (got or "").split()
    matched = sum(block.size for block in difflib.SequenceMatcher(a=reference, b=hypothesis,
                                                                  autojunk=False).get_matching_blocks())
    return len(reference) - matched, len(hypothesis) - matched


async def soak(port: int, pid: int, pool: list[np.ndarray], expected: list[str], streams: int, seconds: float,
               sample_s: float) -> tuple[list[dict], list[dict]]:
    """Run the clients until ``seconds`` have passed; returns the sessions and the samples of the server."""
    started = time.perf_counter()
    sessions: list[dict] = []
    samples: list[dict] = []

    async def client(index: int) -> None:
        k = index * len(pool) // streams
        await asyncio.sleep(index / streams)  # staggered: the streams are at different positions
        while time.perf_counter() - started < seconds:
            i = k % len(pool)
            result = await run_client(port, pool[i], 0.0)
            lost, added = word_errors(expected[i], result["text"])
            sessions.append({"utterance": i, "equal": result["text"] == expected[i], "lost_words": lost,
                             "added_words": added, "offline_words": len(expected[i].split()),
                             "failure": result["failure"], "client_delays_ms": result["client_delays_ms"]})
            k += 1

    async def sampler() -> None:
        cpu_before = process_cpu_s(pid)
        while True:
            elapsed = time.perf_counter() - started
            samples.append({"t_s": round(elapsed, 1), "rss_mb": round(server_rss_mb(pid), 2),
                            "server_cores": (process_cpu_s(pid) - cpu_before) / max(elapsed, 1e-9),
                            "sessions_done": len(sessions), "load_1min": os.getloadavg()[0]})
            await asyncio.sleep(sample_s)

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(client(i) for i in range(streams)))
    sampling.cancel()
    elapsed = time.perf_counter() - started
    samples.append({"t_s": round(elapsed, 1), "rss_mb": round(server_rss_mb(pid), 2),
                    "server_cores": samples[-1]["server_cores"], "sessions_done": len(sessions),
                    "load_1min": os.getloadavg()[0]})
    return sessions, samples


def rss_trend(samples: list[dict]) -> dict:
    """RSS growth and slope after the warm-up (the whole run when it is shorter than twice the warm-up)."""
    warm_up = WARM_UP_S if samples[-1]["t_s"] >= 2 * WARM_UP_S else 0.0
    after = [s for s in samples if s["t_s"] >= warm_up]
    t = np.array([s["t_s"] for s in after])
    rss = np.array([s["rss_mb"] for s in after])
    slope = float(np.polyfit(t, rss, 1)[0]) * 3600 if len(after) > 1 else float("nan")
    return {"from_s": float(t[0]), "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]),
            "rss_max_mb": float(rss.max()), "growth_mb": float(rss[-1] - rss[0]), "slope_mb_per_hour": slope}


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["t_s"] / 60 for s in samples], [s["rss_mb"] for s in samples], "o-", markersize=3)
    ax.set_xlabel("minutes")
    ax.set_ylabel("server resident set size (MB)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--chunk-ms", type=float, default=40.0)
    parser.add_argument("--checkpoint", type=Path, help="fine-tuned checkpoint (default: runs/demo/finetune "
                                                        "if present, else a tiny model trained here)")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--audio", choices=("speech", "tones"), default="speech")
    parser.add_argument("--corpus", type=Path, default=ROOT / "runs" / "demo" / "corpus" / "test.jsonl")
    parser.add_argument("--name", default="serve_soak")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(minutes=0.1, streams=2, sample_s=1.0, audio="tones"))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or (ROOT / "runs" / "demo" / "finetune")
        model_name = str(checkpoint)
        if not checkpoint.exists() or (args.smoke and not args.checkpoint):
            checkpoint = trained_tiny_checkpoint(Path(scratch), 2)
            model_name = "tiny tone-corpus model (2 steps)"
        pool, audio_name = utterance_pool(args.audio, args.corpus, Path(scratch), args.smoke)
        expected = offline_transcripts(checkpoint, pool)
        server, hello = start_server(checkpoint, args.chunk_ms, args.backend, args.streams)
        try:
            sessions, samples = asyncio.run(soak(hello["port"], server.pid, pool, expected, args.streams,
                                                 60 * args.minutes, args.sample_s))
            server.stdin.close()
            stats = json.loads(server.stdout.readline())
        finally:
            server.kill()
            server.wait()
    delays = [d for s in sessions for d in s["client_delays_ms"]]
    summary = {
        "streams": args.streams, "minutes": args.minutes, "backend": args.backend, "chunk_ms": args.chunk_ms,
        "declared_ms": hello["declared"]["declared_latency_ms"], "sessions": len(sessions),
        "sessions_equal": sum(s["equal"] for s in sessions),
        "failures": sorted({s["failure"] for s in sessions if s["failure"]}),
        "offline_words": sum(s["offline_words"] for s in sessions),
        "lost_words": sum(s["lost_words"] for s in sessions), "added_words": sum(s["added_words"] for s in sessions),
        "client_word_delay_p50_ms": float(np.percentile(delays, 50)) if delays else None,
        "client_word_delay_p95_ms": float(np.percentile(delays, 95)) if delays else None,
        "server_cores": samples[-1]["server_cores"], "rss": rss_trend(samples), **stats}
    print(f"model: {model_name}; {audio_name}; {args.streams} streams for {args.minutes:g} min")
    print(markdown_table(
        ["sessions", "transcripts = offline", "offline words", "lost", "added", "word delay p50 / p95 ms (client)",
         "server cores", "RSS first / last / max MB", "RSS growth MB", "RSS slope MB/h"],
        [[summary["sessions"], f"{summary['sessions_equal']}/{summary['sessions']}", summary["offline_words"],
          summary["lost_words"], summary["added_words"],
          f"{summary['client_word_delay_p50_ms'] or float('nan'):.0f} / "
          f"{summary['client_word_delay_p95_ms'] or float('nan'):.0f}",
          f"{summary['server_cores']:.2f}", f"{summary['rss']['rss_first_mb']:.1f} / "
          f"{summary['rss']['rss_last_mb']:.1f} / {summary['rss']['rss_max_mb']:.1f}",
          f"{summary['rss']['growth_mb']:+.1f} (from {summary['rss']['from_s']:g} s)",
          f"{summary['rss']['slope_mb_per_hour']:+.1f}"]]))
    print(markdown_table(["t s", "server RSS MB", "sessions done", "server cores", "load (1 min)"],
                         [[f"{s['t_s']:g}", f"{s['rss_mb']:.1f}", s["sessions_done"], f"{s['server_cores']:.2f}",
                           f"{s['load_1min']:.1f}"] for s in samples]))
    unequal = [{k: v for k, v in s.items() if k != "client_delays_ms"} for s in sessions if not s["equal"]]
    write_json(args.out / f"{args.name}.json", {"model": model_name, "audio": audio_name, "summary": summary,
                                                "samples": samples, "sessions_unequal": unequal})
    plot(samples, args.out / f"{args.name}.png",
         f"streamssl serve soak: {args.streams} real-time streams, {model_name}")


if __name__ == "__main__":
    main()
