"""``streamssl stream`` holds one block of audio at a time: an hour of audio streams in bounded memory,
and piped output stays small."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from streamssl import EncoderConfig
from streamssl.train.checkpoint import build_model, save_checkpoint
from streamssl.train.config import preset

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
HOUR_S = 3600
# The decoded hour alone is 230 MB of float32; streaming it must stay far below that.
GROWTH_BOUND_MB = 100

MEASURE = """
import json, sys
sys.path.insert(0, {benchmarks!r})
from common import peak_rss_mb, reset_peak_rss
from streamssl.cli import main
# The command imports torch and the model code itself (lazily, for a fast --help): import them first, so
# the baseline holds what any run holds and the growth is streaming's.
import streamssl.commands.stream, streamssl.streaming.recognizer, streamssl.train.checkpoint
before = reset_peak_rss()
code = main({argv!r})
with open({result!r}, "w") as out:
    json.dump({{"code": code, "before_mb": before, "peak_mb": peak_rss_mb()}}, out)
"""


def write_hour(path: Path) -> None:
    """An hour of quiet noise at 16 kHz, written a minute at a time."""
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", samplerate=RATE, channels=1, subtype="PCM_16") as out:
        for _ in range(HOUR_S // 60):
            out.write((0.01 * rng.standard_normal(60 * RATE)).astype(np.float32))


def smallest_checkpoint(path: Path) -> None:
    """A one-layer tiny CTC model (untrained: only memory and the output path are under test)."""
    config = preset("finetune", "tiny")
    config.encoder = EncoderConfig.tiny(mixer="llsa", n_layers=1, d_model=16, n_heads=2, ffn_dim=32,
                                        conv_channels=8)
    torch.manual_seed(0)
    model = build_model("finetune", config, config.encoder)
    save_checkpoint(path, {"kind": "finetune", "encoder_config": config.encoder.to_dict(),
                           "task_config": config.to_dict(), "vocab": model.vocab.symbols,
                           "model": model.state_dict(), "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}})


@pytest.mark.slow
def test_an_hour_streams_in_bounded_memory(tmp_path):
    audio = tmp_path / "hour.wav"
    write_hour(audio)
    checkpoint = tmp_path / "checkpoint.pt"
    smallest_checkpoint(checkpoint)
    result = tmp_path / "result.json"
    argv = ["stream", "--checkpoint", str(checkpoint), str(audio), "--chunk-ms", "1000"]
    code = MEASURE.format(benchmarks=str(ROOT / "benchmarks"), argv=argv, result=str(result))
    with (tmp_path / "stdout.txt").open("w") as stdout:  # a file, not a terminal: the piped display
        subprocess.run([sys.executable, "-c", code], stdout=stdout, check=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    measured = json.loads(result.read_text())
    assert measured["code"] == 0
    growth_mb = measured["peak_mb"] - measured["before_mb"]
    assert growth_mb < GROWTH_BOUND_MB, f"streaming an hour grew the peak RSS by {growth_mb:.0f} MB"
    printed = (tmp_path / "stdout.txt").read_text()
    assert f"latency report ({HOUR_S:.2f} s of audio, {HOUR_S} model calls" in printed
    # One final transcript line plus only what each update added: never the transcript on every line.
    transcript = next(line for line in printed.splitlines() if line.startswith(f"{audio}: "))
    assert len(printed) < 3 * len(transcript) + 10_000
