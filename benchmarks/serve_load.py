"""Load test of ``streamssl serve``: N concurrent clients stream speech at real-time pace over loopback.

    python benchmarks/serve_load.py [--clients 1 16 32 64 128] [--seconds 30] [--chunks-ms 40]
        [--checkpoint DIR] [--backend torch|onnx|runtime] [--int8] [--corpus test.jsonl | --audio tones] [--smoke]

Model: ``runs/demo/finetune`` when it exists (or ``--checkpoint``), otherwise a tiny CTC model (the
``tiny`` fine-tune preset, LLSA, 0.03 M parameters) trained for 300 steps (``--train-steps``) on the tone
corpus of ``tests/train_corpus.py`` (each character a tone of its own pitch), so it really transcribes.
``--backend onnx`` serves the model's step exported to ONNX Runtime (``streamssl serve --backend onnx``);
``--backend runtime`` exports it once here (``--int8``: quantised) and serves the file in a server process that
never imports PyTorch, as ``streamssl serve --model FILE.onnx`` does.
``--smoke`` always takes the tiny model, trained for 2 steps, tone audio, 2 clients and 1 s of audio each.

Audio (``--audio speech``, the default): the demo's test utterances (``--corpus``, default
``runs/demo/corpus/test.jsonl``; when it is absent, a small corpus made here with ``streamssl corpus synth``,
eSpeak NG speech), each client its own run of consecutive utterances separated by ``--gap-s`` (0.8 s) of
silence, about ``--seconds`` long; 16 distinct runs, reused round robin. ``--audio tones``: tone
utterances of 2-5 words of the tone corpus's vocabulary separated by 0.8 s of low noise.

Method. The server runs in its own process (one torch thread) exactly as ``streamssl serve`` does:
``StreamingServer`` on 127.0.0.1 with the default batching (``max_batch`` 64, ``max_wait_ms`` 10) and
endpointing (600 ms), ``max_streams`` the number of clients. Clients start at staggered moments within
the first second (so their streams are at different positions, as live traffic is) and send PCM16 at
16 kHz in 40 ms messages at real-time pace, then the stop message, and wait for ``done``.

Measured: every client's final transcript against offline decoding (one forward pass of the PyTorch model
over the same, PCM16-quantised, audio); emission delay per word seen by the client: the time its last
character's token arrived minus the time the client sent the message holding that character's last
frame-window sample (the page measures the same); the server's own figure (from receiving that message
to handing the token to the socket); the server process's CPU time over the streaming window (cores
used = CPU seconds / wall seconds), the client process's, and the 1-minute load average (the machine
may be shared); the server's ticks, model calls, and its worker's seconds in the model call against
those building the sessions' messages (CPU seconds of the worker thread). Each point is bounded: a client that is not done 60 s after its
stop counts as failed.

Prints a markdown table; writes JSON and a PNG plot to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, add_common_options, markdown_table, parse_args, trained_tiny_checkpoint, write_json

RATE = 16000
BLOCK_S = 0.04
GAP_S = 0.8
DONE_TIMEOUT_S = 60.0
DISTINCT_AUDIO = 16
MAX_CLIENTS = 128


# ------------------------------------------------------------------------------------------ model and audio
def pcm16_quantised(audio: np.ndarray) -> np.ndarray:
    """What the server receives of float ``audio`` sent as PCM16, as float32."""
    return (np.round(audio * 32768).clip(-32768, 32767).astype(np.int16) / 32768.0).astype(np.float32)


def speech_corpus(corpus: Path | None, scratch: Path) -> Path:
    """The test manifest to take speech from: ``corpus``, or one synthesised here when it is absent."""
    if corpus is not None and corpus.exists():
        return corpus
    print(f"no corpus at {corpus}; synthesising a small one with streamssl corpus synth", file=sys.stderr)
    out = scratch / "synth"
    subprocess.run([sys.executable, "-m", "streamssl", "corpus", "synth", "--out", str(out), "--hours", "0.05",
                    "--seed", "0", "--workers", "1"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return out / "test.jsonl"


def speech_runs(manifest: Path, seconds: float, gap_s: float = GAP_S) -> list[np.ndarray]:
    """:data:`DISTINCT_AUDIO` runs of consecutive utterances of ``manifest`` (each from its own first
    utterance, wrapping around), ``gap_s`` of silence between them, about ``seconds`` long, PCM16-quantised."""
    from streamssl.data import load_utterances
    from streamssl.data.audio import load_audio

    utterances = load_utterances(manifest)
    cache: dict[int, np.ndarray] = {}
    runs = []
    for index in range(DISTINCT_AUDIO):
        parts, total, k = [np.zeros(int(0.3 * RATE), np.float32)], 0.3, index * len(utterances) // DISTINCT_AUDIO
        while total < seconds:
            i = k % len(utterances)
            if i not in cache:
                cache[i] = load_audio(utterances[i].audio, RATE)
            parts += [cache[i], np.zeros(int(gap_s * RATE), np.float32)]
            total += (parts[-2].size + parts[-1].size) / RATE
            k += 1
        runs.append(pcm16_quantised(np.concatenate(parts)))
    return runs


def client_audio(index: int, seconds: float) -> np.ndarray:
    """About ``seconds`` of tone speech, PCM16-quantised (what the server receives), float32."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train_corpus import WORDS, tone_audio

    rng = np.random.default_rng(1000 + index)
    parts, total = [0.01 * rng.standard_normal(int(0.3 * RATE))], 0.3
    while total < seconds:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        parts += [tone_audio(text, rng), 0.01 * rng.standard_normal(int(GAP_S * RATE))]
        total += (parts[-2].size + parts[-1].size) / RATE
    return pcm16_quantised(np.concatenate(parts).astype(np.float32))


def offline_transcripts(checkpoint: Path, audios: list[np.ndarray]) -> list[str]:
    import torch

    from streamssl.asr.ctc import greedy_decode
    from streamssl.train.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, kind="finetune").model.eval()
    out = []
    with torch.no_grad():
        for audio in audios:
            log_probs, lengths = model(torch.from_numpy(audio)[None])
            out.append(greedy_decode(log_probs, lengths, model.vocab)[0])
    return out


# ------------------------------------------------------------------------------------------ server process
# argv: checkpoint (an export for backend runtime), chunk ms, backend, max streams, model threads. Prints the port,
# then, once stdin closes, its counters.
SERVER_CODE = """
import asyncio, json, sys
from streamssl.serve import ServeConfig, StreamingServer
from streamssl.streaming import Recognizer

async def main():
    if sys.argv[3] == "runtime":
        recognizer = Recognizer.from_export(sys.argv[1], chunk_ms=float(sys.argv[2]), threads=int(sys.argv[5]))
    else:
        import torch
        torch.set_num_threads(int(sys.argv[5]))
        recognizer = Recognizer.from_checkpoint(sys.argv[1], chunk_ms=float(sys.argv[2]), backend=sys.argv[3])
    assert sys.argv[3] != "runtime" or "torch" not in sys.modules, "the runtime server imported torch"
    async with StreamingServer(recognizer, ServeConfig(max_streams=int(sys.argv[4])), port=0) as server:
        print(json.dumps({"port": server.port, "declared": server.declared}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        sizes = server.batch_sizes
        print(json.dumps({"ticks": server.ticks, "model_calls": recognizer.calls,
                          "mean_streams_per_tick": sum(sizes) / max(1, len(sizes)),
                          "worker_model_cpu_s": server.model_cpu_s, "worker_messages_cpu_s": server.messages_cpu_s,
                          "refused": server.refused}), flush=True)

asyncio.run(main())
"""


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ one client
async def send_at_pace(ws, audio: np.ndarray, block: int, sent: list[tuple[int, float]] | None = None) -> None:
    """Send float ``audio`` at 16 kHz as PCM16 messages of ``block`` samples at real-time pace, then the stop
    message; ``sent`` collects (samples sent so far, time) after each message."""
    pcm = np.round(audio * 32768).clip(-32768, 32767).astype("<i2")
    started = time.perf_counter()
    for start in range(0, pcm.size, block):
        piece = pcm[start:start + block]
        await asyncio.sleep(max(0.0, started + (start + piece.size) / RATE - time.perf_counter()))
        await ws.send(piece.tobytes())
        if sent is not None:
            sent.append((start + piece.size, time.perf_counter()))
    await ws.send(json.dumps({"type": "stop"}))


async def run_client(port: int, audio: np.ndarray, start_delay_s: float) -> dict:
    from websockets.asyncio.client import connect

    await asyncio.sleep(start_delay_s)
    block = int(BLOCK_S * RATE)
    sent: list[tuple[int, float]] = []
    token_seen: dict[float, float] = {}
    finals: list[tuple[dict, float]] = []
    done: dict = {}
    errors: list[str] = []
    async with connect(f"ws://127.0.0.1:{port}/asr", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "format": "pcm16"}))
        json.loads(await ws.recv())

        async def read() -> None:
            async for message in ws:
                now = time.perf_counter()
                data = json.loads(message)
                if data["type"] == "partial":
                    for token in data["tokens"]:
                        token_seen.setdefault(token["end_s"], now)
                elif data["type"] == "final":
                    finals.append((data, now))
                elif data["type"] == "done":
                    done.update(data)
                elif data["type"] == "error":
                    errors.append(data["message"])

        reader = asyncio.create_task(read())
        await send_at_pace(ws, audio, block, sent)
        try:
            await asyncio.wait_for(reader, DONE_TIMEOUT_S)
        except TimeoutError:
            return {"text": None, "failure": f"not done {DONE_TIMEOUT_S:g} s after stop",
                    "client_delays_ms": [], "server_delays_ms": []}
    client_delays, server_delays = [], []
    for final, received in finals:
        for word in final["words"]:
            needed = math.ceil(word["end_s"] * RATE - 1e-6)
            _, sent_at = sent[min(bisect.bisect_left(sent, needed, key=lambda entry: entry[0]), len(sent) - 1)]
            client_delays.append(1000 * (token_seen.get(word["end_s"], received) - sent_at))
            server_delays.append(word["delay_ms"])
    failure = None if done else f"closed {ws.close_code} without done: {'; '.join(errors) or ws.close_reason}"
    return {"text": done.get("text"), "failure": failure, "client_delays_ms": client_delays,
            "server_delays_ms": server_delays}


async def run_point(port: int, audios: list[np.ndarray], clients: int) -> list[dict]:
    rng = np.random.default_rng(clients)
    offsets = rng.uniform(0.0, 1.0, clients)
    return await asyncio.gather(*(run_client(port, audios[i % len(audios)], float(offsets[i]))
                                  for i in range(clients)))


def start_server(checkpoint: Path, chunk_ms: float, backend: str, max_streams: int, threads: int = 1
                 ) -> tuple[subprocess.Popen, dict]:
    """The server process and its first line (port, declared latency)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(checkpoint), str(chunk_ms), backend,
                               str(max_streams), str(threads)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return server, json.loads(server.stdout.readline())


def measure(checkpoint: Path, chunk_ms: float, clients: int, audios: list[np.ndarray], expected: list[str],
            backend: str = "torch", threads: int = 1) -> dict:
    server, hello = start_server(checkpoint, chunk_ms, backend, clients, threads)
    try:
        load_before = os.getloadavg()[0]
        cpu_before, client_cpu_before, wall_before = process_cpu_s(server.pid), time.process_time(), time.perf_counter()
        results = asyncio.run(run_point(hello["port"], audios, clients))
        wall_s = time.perf_counter() - wall_before
        server_cpu_s = process_cpu_s(server.pid) - cpu_before
        client_cpu_s = time.process_time() - client_cpu_before
        load = (load_before + os.getloadavg()[0]) / 2
        server.stdin.close()
        stats = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    correct = sum(r["text"] == expected[i % len(expected)] for i, r in enumerate(results))
    failures = sorted({r["failure"] or "transcript differs from offline" for i, r in enumerate(results)
                       if r["text"] != expected[i % len(expected)]})
    client = [d for r in results for d in r["client_delays_ms"]]
    server_side = [d for r in results for d in r["server_delays_ms"]]
    declared = hello["declared"]["declared_latency_ms"]
    p95 = float(np.percentile(client, 95)) if client else math.nan
    return {"chunk_ms": chunk_ms, "backend": backend, "clients": clients, "declared_ms": declared,
            "audio_s_per_client": round(float(np.mean([a.size for a in audios])) / RATE, 1),
            "correct": correct, "failures": failures, "words": len(client),
            "client_word_delay_p50_ms": float(np.percentile(client, 50)) if client else math.nan,
            "client_word_delay_p95_ms": p95,
            "server_word_delay_p50_ms": float(np.percentile(server_side, 50)) if server_side else math.nan,
            "server_word_delay_p95_ms": float(np.percentile(server_side, 95)) if server_side else math.nan,
            "goal_met": bool(correct == clients and p95 <= declared + 100),
            "wall_s": wall_s, "server_cores": server_cpu_s / wall_s, "client_cores": client_cpu_s / wall_s,
            "load_1min": load, **stats}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_delay, ax_cpu) = plt.subplots(1, 2, figsize=(11, 4))
    for chunk_ms in sorted({r["chunk_ms"] for r in rows}):
        part = [r for r in rows if r["chunk_ms"] == chunk_ms]
        clients = [r["clients"] for r in part]
        line, = ax_delay.plot(clients, [r["client_word_delay_p95_ms"] for r in part], "o-",
                              label=f"{chunk_ms:g} ms chunks, p95")
        ax_delay.plot(clients, [r["client_word_delay_p50_ms"] for r in part], "o--", color=line.get_color(),
                      label=f"{chunk_ms:g} ms chunks, p50")
        ax_delay.axhline(part[0]["declared_ms"] + 100, color=line.get_color(), linestyle=":",
                         label=f"goal: declared {part[0]['declared_ms']:g} + 100 ms")
        ax_cpu.plot(clients, [r["server_cores"] for r in part], "o-", label=f"server, {chunk_ms:g} ms chunks")
        ax_cpu.plot(clients, [r["client_cores"] for r in part], "o--", color=ax_cpu.lines[-1].get_color(),
                    label=f"clients, {chunk_ms:g} ms chunks")
    for ax in (ax_delay, ax_cpu):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent real-time streams")
        ax.legend(fontsize=7)
    ax_delay.set_yscale("log")
    ax_delay.set_ylabel("word emission delay seen by the client (ms)")
    ax_cpu.set_ylabel("CPU cores used")
    fig.suptitle("streamssl serve under load (loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    parser.add_argument("--chunks-ms", type=float, nargs="+", default=[40.0])
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per client (at least this long)")
    parser.add_argument("--checkpoint", type=Path, help="fine-tuned checkpoint (default: runs/demo/finetune "
                                                        "if present, else a tiny model trained here)")
    parser.add_argument("--backend", choices=("torch", "onnx", "runtime"), default="torch",
                        help="the server's model runtime: torch or onnx as streamssl serve --backend, runtime as "
                             "streamssl serve --model FILE.onnx (no PyTorch in the server; default torch)")
    parser.add_argument("--int8", action="store_true",
                        help="with --backend runtime: export the int8 model (its transcripts are still compared "
                             "with the float32 model's offline decoding)")
    parser.add_argument("--threads", type=int, default=1, help="the server's model threads (serve --threads; default 1)")
    parser.add_argument("--audio", choices=("speech", "tones"), default="speech",
                        help="speech: utterances of --corpus; tones: the tone corpus's words (default speech)")
    parser.add_argument("--corpus", type=Path, default=ROOT / "runs" / "demo" / "corpus" / "test.jsonl",
                        help="manifest of the speech (default runs/demo/corpus/test.jsonl; synthesised when absent)")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps of the tiny model")
    parser.add_argument("--name", default="serve_load")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(clients=[2], seconds=1.0, train_steps=2, audio="tones"))
    if args.int8 and args.backend != "runtime":
        parser.error("--int8 goes with --backend runtime (the server that loads an export)")
    import torch

    # One thread here as in the server: on a small shared machine more threads only spin.
    torch.set_num_threads(1)
    if max(args.clients) > MAX_CLIENTS or args.seconds > 120:
        raise SystemExit(f"bounded benchmark: at most {MAX_CLIENTS} clients and 120 s of audio per client")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or (ROOT / "runs" / "demo" / "finetune")
        model_name = str(checkpoint)
        if not checkpoint.exists() or (args.smoke and not args.checkpoint):
            checkpoint = trained_tiny_checkpoint(Path(scratch), args.train_steps)
            model_name = f"tiny tone-corpus model ({args.train_steps} steps)"
        if args.audio == "speech":
            manifest = speech_corpus(args.corpus, Path(scratch))
            audios, audio_name = speech_runs(manifest, args.seconds), f"speech of {manifest}"
        else:
            audios, audio_name = [client_audio(i, args.seconds) for i in range(DISTINCT_AUDIO)], "tone speech"
        expected = offline_transcripts(checkpoint, audios)
        rows = []
        for chunk_ms in args.chunks_ms:
            for clients in args.clients:
                source = checkpoint
                if args.backend == "runtime":
                    source = Path(scratch) / f"model-{chunk_ms:g}ms.onnx"
                    if not source.exists():
                        from streamssl.export import export_model
                        from streamssl.train.checkpoint import load_checkpoint

                        export_model(load_checkpoint(checkpoint, kind="finetune").model, chunk_ms, source,
                                     int8=args.int8)
                row = measure(source, chunk_ms, clients, audios, expected, args.backend, args.threads)
                row.update(int8=args.int8, threads=args.threads)
                print(json.dumps(row), flush=True)
                rows.append(row)
    header = ["backend", "threads", "chunk ms", "clients", "declared ms", "transcripts = offline", "word delay p50 / p95 ms (client)",
              "word delay p50 / p95 ms (server)", "p95 ≤ declared + 100", "server cores", "client cores",
              "streams per tick", "model calls per tick", "worker CPU s: model / messages", "load (1 min)"]
    table = [[r["backend"] + (" int8" if r["int8"] else ""), r["threads"], f"{r['chunk_ms']:g}", r["clients"], f"{r['declared_ms']:g}", f"{r['correct']}/{r['clients']}",
              f"{r['client_word_delay_p50_ms']:.0f} / {r['client_word_delay_p95_ms']:.0f}",
              f"{r['server_word_delay_p50_ms']:.0f} / {r['server_word_delay_p95_ms']:.0f}",
              "yes" if r["goal_met"] else "no", f"{r['server_cores']:.2f}", f"{r['client_cores']:.2f}",
              f"{r['mean_streams_per_tick']:.1f}", f"{r['model_calls'] / max(1, r['ticks']):.2f}",
              f"{r['worker_model_cpu_s']:.1f} / {r['worker_messages_cpu_s']:.1f}", f"{r['load_1min']:.1f}"] for r in rows]
    print(f"model: {model_name}; {audio_name}, {rows[0]['audio_s_per_client']} s of audio per client")
    print(markdown_table(header, table))
    write_json(args.out / f"{args.name}.json", {"model": model_name, "audio": audio_name, "rows": rows})
    plot(rows, args.out / f"{args.name}.png")


if __name__ == "__main__":
    main()
