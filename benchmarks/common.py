"""Shared measuring tools for the benchmark scripts (not a test: numbers go to docs/benchmarks.md).

Peak memory on CPU is measured in a fresh subprocess per point, as the growth of the peak resident set
size (``ru_maxrss``) over the resident size just before the measured forward+backward; on CUDA it is
``torch.cuda.max_memory_allocated`` over the memory allocated before.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from streamssl import Encoder, EncoderConfig

ROOT = Path(__file__).resolve().parent.parent


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fwd_bwd_point(config: dict, frames: int, batch: int, device: str, repeats: int) -> dict:
    """Time and peak memory of one forward+backward of an encoder on random frames (this process)."""
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig.from_dict(config)).to(device).train()
    dim = encoder.config.input_dim

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
        before = current_rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(frames)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return {"time_s": min(times), "peak_mb": peak - before}


def measure_in_subprocess(config: dict, frames: int, batch: int = 1, device: str = "cpu",
                          repeats: int = 1, threads: int | None = None, timeout_s: float = 900) -> dict:
    """Run :func:`fwd_bwd_point` in a fresh interpreter so that peak RSS belongs to this point alone."""
    request = json.dumps(dict(config=config, frames=frames, batch=batch, device=device, repeats=repeats,
                              threads=threads))
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
