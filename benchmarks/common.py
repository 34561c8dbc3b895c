"""Shared measuring tools for the benchmark scripts (not a test: numbers go to docs/benchmarks.md).

Peak memory on CPU is measured in a fresh subprocess per point, as the growth of the peak resident set
size over the resident size just before the measured forward+backward. The peak is Linux's ``VmHWM``,
reset first through ``/proc/self/clear_refs`` (``ru_maxrss`` would not do: a child inherits its
parent's peak). On CUDA it is ``torch.cuda.max_memory_allocated`` over the memory allocated before.
torch and streamssl are imported where they are used, so that a parent process that only starts the
measuring children stays light.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--out`` (where results go) and ``--smoke`` (the toy run CI makes: does the script still work?)."""
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for the JSON and plots (default: docs/benchmarks; a fresh temporary folder "
                             "with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes and one repeat, seconds in all: checks that the script runs against "
                             "today's API; its numbers mean nothing")


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, Any], argv: list[str] | None = None
               ) -> argparse.Namespace:
    """Parse the command line; with ``--smoke`` the values of ``smoke`` replace the defaults (options given on
    the command line still win), and ``--out`` defaults to a fresh temporary folder so that a smoke run never
    overwrites the published results."""
    args = parser.parse_args(argv)
    if not args.smoke:
        return args
    parser.set_defaults(**smoke, out=Path(tempfile.mkdtemp(prefix="streamssl-bench-")))
    return parser.parse_args(argv)


def trained_tiny_checkpoint(folder: Path, steps: int = 300) -> Path:
    """A ``tiny`` fine-tune preset model (LLSA, 0.03 M parameters) trained for ``steps`` steps on the tone corpus
    of ``tests/train_corpus.py`` (each character a tone of its own pitch), so that it really transcribes;
    returns its run folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train_corpus import make_corpus

    from streamssl.cli import main

    manifest = make_corpus(folder / "corpus", n=40, words=(2, 3))
    code = main(["finetune", "--preset", "tiny", "--train", str(manifest), "--out", str(folder / "ft"),
                 "--steps", str(steps), "--lr", "0.003", "--set", "max_batch_seconds=8", "--no-progress"])
    if code != 0:
        raise SystemExit("training the tiny benchmark model failed")
    return folder / "ft"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: CPU peak memory needs Linux")


def reset_peak_rss() -> float:
    """Reset the peak resident set size to the current one, and return it in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, in MB."""
    return _status_mb("VmHWM")


def fwd_bwd_point(config: dict, frames: int, batch: int, device: str, repeats: int, checkpoint: bool = False
                  ) -> dict:
    """Time and peak memory of one forward+backward of an encoder on random frames (this process); with
    ``checkpoint``, activation checkpointing per block (:func:`streamssl.mixers.checkpoint_blocks`)."""
    import torch

    from streamssl import Encoder, EncoderConfig
    from streamssl.mixers import checkpoint_blocks

    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig.from_dict(config)).to(device).train()
    if checkpoint:
        checkpoint_blocks(encoder)
    dim = encoder.frontend.input_dim

    def run(n_frames: int) -> None:
        x = torch.randn(batch, n_frames, dim, device=device)
        y, _ = encoder(x)
        y.float().pow(2).mean().backward()
        encoder.zero_grad(set_to_none=True)

    run(min(frames, 64))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = reset_peak_rss()
    # On CPU the process's CPU time, not wall-clock: the development machines are shared, and with one
    # thread CPU time is what an idle core's wall-clock time would be.
    clock = time.perf_counter if device == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        start = clock()
        run(frames)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"time_s": min(times), "peak_mb": peak - before}


def measure_in_subprocess(config: dict, frames: int, batch: int = 1, device: str = "cpu",
                          repeats: int = 1, threads: int | None = 1, timeout_s: float = 1800,
                          checkpoint: bool = False) -> dict:
    """Run :func:`fwd_bwd_point` in a fresh interpreter so that peak RSS belongs to this point alone."""
    request = json.dumps(dict(config=config, frames=frames, batch=batch, device=device, repeats=repeats,
                              threads=threads, checkpoint=checkpoint))
    code = ("import json, sys, torch; sys.path.insert(0, %r); from common import fwd_bwd_point; "
            "r = json.loads(sys.argv[1]); t = r.pop('threads'); t and torch.set_num_threads(t); "
            "print(json.dumps(fwd_bwd_point(**r)))") % str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
