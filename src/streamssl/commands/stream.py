"""``streamssl stream``: recognise audio files chunk by chunk, show the partial transcript, report latency."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from typing import TextIO

import numpy as np
import torch

from streamssl.streaming.pacing import PacedClock
from streamssl.streaming.recognizer import Recognizer, Stream
from streamssl.streaming.report import build_report


class PartialDisplay:
    """Shows a stream's transcript as it grows: rewritten in place on a terminal, one line per change
    when the output is a pipe or a file (so a log keeps every step)."""

    def __init__(self, name: str, out: TextIO):
        self.name = name
        self.out = out
        self.in_place = out.isatty()
        self.shown = ""

    def show(self, text: str) -> None:
        if text == self.shown:
            return
        self.shown = text
        line = f"{self.name}: {text}"
        if self.in_place:
            width = shutil.get_terminal_size().columns - 1
            if len(line) > width:
                line = "…" + line[len(line) - width + 1:]
            self.out.write("\r\x1b[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self, text: str) -> None:
        """Print the final transcript and leave the line."""
        if self.in_place:
            self.out.write("\r\x1b[K")
        self.out.write(f"{self.name}: {text}\n")
        self.out.flush()


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``; says on stderr when it resamples or downmixes."""
    from streamssl.data.audio import audio_info, load_audio

    info = audio_info(path)
    if info.channels > 1:
        print(f"notice: {path}: {info.channels} channels, averaged to mono", file=sys.stderr)
    if info.sample_rate != sample_rate:
        print(f"notice: {path}: {info.sample_rate} Hz, resampled to {sample_rate} Hz", file=sys.stderr)
    audio = load_audio(path, sample_rate)
    if audio.size == 0:
        raise ValueError(f"{path}: no audio samples")
    return audio


def stream_file(recognizer: Recognizer, clock: PacedClock, audio: np.ndarray, chunk_samples: int,
                display: PartialDisplay | None) -> Stream:
    """Feed ``audio`` in chunks at real-time pace (slept or simulated by ``clock``); returns the finished stream."""
    stream = recognizer.stream()
    samples = torch.from_numpy(audio)
    clock.start()
    for start in range(0, samples.numel(), chunk_samples):
        piece = samples[start:start + chunk_samples]
        clock.wait_until((start + piece.numel()) / recognizer.sample_rate)
        update = stream.accept(piece)
        if display is not None and update.tokens:
            display.show(update.partial)
    transcript = stream.finish()
    if display is not None:
        display.done(transcript.text)
    return stream


def cmd_stream(args: argparse.Namespace) -> int:
    if args.chunk_ms <= 0:
        raise ValueError(f"--chunk-ms must be positive, got {args.chunk_ms}")
    torch.set_num_threads(args.threads)
    # read_audio gives its own per-file notice; the loader's once-per-rate warning would repeat it.
    logging.getLogger("streamssl.data.audio").setLevel(logging.ERROR)
    clock = PacedClock(simulate=not args.realtime)
    recognizer = Recognizer.from_checkpoint(args.checkpoint, chunk_ms=args.chunk_ms, clock=clock.now,
                                            backend=args.backend)
    chunk_samples = recognizer.chunk_samples
    streams, results, failed = [], [], []
    for path in args.files:
        try:
            audio = read_audio(path, recognizer.sample_rate)
        except ValueError as error:
            print(f"streamssl stream: error: {error}", file=sys.stderr)
            failed.append({"file": path, "error": str(error)})
            continue
        display = None if args.json else PartialDisplay(path, sys.stdout)
        stream = stream_file(recognizer, clock, audio, chunk_samples, display)
        streams.append(stream)
        results.append({"file": path, "audio_s": audio.size / recognizer.sample_rate, "transcript": stream.text,
                        "words": [{"text": w.text, "start_s": w.start_s, "end_s": w.end_s,
                                   "delay_ms": 1000 * w.delay_s} for w in stream.words]})
    pace = "real-time" if args.realtime else "simulated real-time (clock skips the waits)"
    report = build_report(recognizer, streams, pace) if streams else None
    if args.json:
        print(json.dumps({"files": results, "failed": failed,
                          "latency": report.to_dict() if report is not None else None}, indent=2))
    elif report is not None:
        print()
        print(report.format())
    if failed:
        print(f"streamssl stream: {len(failed)} of {len(args.files)} file(s) failed: "
              + ", ".join(f["file"] for f in failed), file=sys.stderr)
        return 1
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stream", help="recognise audio files chunk by chunk and report latency",
        description="Stream audio files through a fine-tuned CTC checkpoint chunk by chunk, show the partial "
                    "transcript as it grows, then print a latency report: declared algorithmic latency, "
                    "compute per chunk, real-time factor and emission delay per word. Without --realtime the "
                    "files are fed as fast as the CPU allows on a clock that skips the waits between chunks, "
                    "so emission delays are still those of live audio.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (any rate or channel count)")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (file or run folder)")
    parser.add_argument("--chunk-ms", type=float, default=40.0, help="audio per model step (default 40)")
    parser.add_argument("--realtime", action="store_true", help="feed at real-time pace, sleeping between chunks")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="run the model in PyTorch, or export its step at --chunk-ms and run it in ONNX Runtime")
    parser.add_argument("--json", action="store_true", help="machine-readable transcripts and report")
    parser.set_defaults(func=cmd_stream)
