"""``streamssl stream``: recognise audio files chunk by chunk, show the partial transcript, report latency."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, TextIO

from streamssl.commands.common import (
    Subcommands, add_chunk_ms, add_decoder_arguments, add_model_arguments, add_threads, beam_config, load_recognizer)

if TYPE_CHECKING:
    import numpy as np

    from streamssl.streaming.pacing import PacedClock
    from streamssl.streaming.recognizer import Recognizer, Stream, Update


class PartialDisplay:
    """Shows a stream's transcript as it grows. On a terminal the partial transcript is rewritten in place,
    its final words plain and the tail that may still change dimmed; on a pipe or a file each update prints
    one line with only what it added (the words that became final, and the audio time they end at), so a
    log keeps every step without repeating the transcript."""

    def __init__(self, name: str, out: TextIO):
        self.name = name
        self.out = out
        self.in_place = out.isatty()

    def show(self, update: Update) -> None:
        if self.in_place:
            if not update.tokens and not update.words:
                return
            width = shutil.get_terminal_size().columns - 1
            if update.unstable:
                # the tail that may still change is dimmed; the final words are cut from the left to fit
                stable, tail = update.stable, update.unstable[-width:]
                room = max(0, width - len(self.name) - 3 - len(tail))
                if len(stable) > room:
                    stable = "…" + stable[len(stable) - room + 1:] if room > 1 else ""
                gap = " " if stable else ""
                self.out.write(f"\r\x1b[K{self.name}: {stable}{gap}\x1b[2m{tail}\x1b[0m")
            else:
                line = f"{self.name}: {update.partial[-width:]}"
                if len(line) > width:
                    line = "…" + line[len(line) - width + 1:]
                self.out.write("\r\x1b[K" + line)
        else:
            if not update.words:
                return
            words = " ".join(word.text for word in update.words)
            self.out.write(f"{self.name} @ {update.words[-1].end_s:.2f} s: {words}\n")
        self.out.flush()

    def done(self, text: str | None) -> None:
        """Print the final transcript (``None``: the stream failed) and leave the line."""
        if self.in_place:
            self.out.write("\r\x1b[K")
        if text is not None:
            self.out.write(f"{self.name}: {text}\n")
        self.out.flush()


def open_audio(path: str, sample_rate: int) -> Iterator[np.ndarray]:
    """Blocks of mono float32 samples at ``sample_rate`` (see :func:`streamssl.data.audio_blocks`); says on
    stderr when it resamples or downmixes, and refuses a file without samples."""
    from streamssl.data.audio import audio_blocks, audio_info

    info = audio_info(path)
    if info.frames == 0:
        raise ValueError(f"{path}: no audio samples")
    if info.channels > 1:
        print(f"notice: {path}: {info.channels} channels, averaged to mono", file=sys.stderr)
    if info.sample_rate != sample_rate:
        print(f"notice: {path}: {info.sample_rate} Hz, resampled to {sample_rate} Hz", file=sys.stderr)
    return audio_blocks(path, sample_rate)


def stream_file(recognizer: Recognizer, clock: PacedClock, blocks: Iterable[np.ndarray], chunk_samples: int,
                display: PartialDisplay | None, hotwords: Sequence[Sequence[str]] = ()) -> Stream:
    """Feed the audio of ``blocks`` in chunks of ``chunk_samples`` at real-time pace (slept or simulated by
    ``clock``); returns the finished stream. Only one block and one chunk are held at a time."""
    import numpy as np

    stream = recognizer.stream(hotwords=hotwords)
    clock.start()
    fed = 0
    carry = np.zeros(0, dtype=np.float32)

    def feed(piece: np.ndarray) -> None:
        nonlocal fed
        fed += piece.size
        clock.wait_until(fed / recognizer.sample_rate)
        update = stream.accept(piece)
        if display is not None:
            display.show(update)

    try:
        for block in blocks:
            carry = np.concatenate([carry, block]) if carry.size else block
            whole = carry.size - carry.size % chunk_samples
            for start in range(0, whole, chunk_samples):
                feed(carry[start:start + chunk_samples])
            carry = carry[whole:]
        if carry.size:
            feed(carry)
    except ValueError:
        if display is not None:
            display.done(None)
        raise
    transcript = stream.finish()
    if display is not None:
        display.done(transcript.text)
    return stream


def read_hotwords(path: str) -> tuple[tuple[str, ...], ...]:
    """The hotword phrases of a UTF-8 file, one a line (:func:`~streamssl.asr.lexicon.parse_hotwords`)."""
    from pathlib import Path

    from streamssl.asr.lexicon import parse_hotwords

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--hotwords {path}: no such file")
    try:
        return parse_hotwords(file.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError as error:
        raise ValueError(f"--hotwords {path}: not UTF-8 text ({error.reason})") from None
    except ValueError as error:
        raise ValueError(f"--hotwords {path}: {error}") from None


def cmd_stream(args: argparse.Namespace) -> int:
    from streamssl.streaming.pacing import PacedClock
    from streamssl.streaming.report import build_report

    beam = beam_config(args)
    hotwords = read_hotwords(args.hotwords) if args.hotwords else ()
    if hotwords and beam is None:
        raise ValueError("--hotwords needs --decoder lexicon; greedy decoding writes the model's own spelling")
    clock = PacedClock(simulate=not args.realtime)
    recognizer = load_recognizer(args, clock.now, beam)
    chunk_samples = recognizer.chunk_samples
    streams, results, failed = [], [], []
    for path in args.files:
        # With --json the transcript as it grows is progress, so it goes to stderr, keeping stdout pure JSON.
        display = (PartialDisplay(path, sys.stdout) if not args.json else
                   None if args.quiet else PartialDisplay(path, sys.stderr))
        try:
            stream = stream_file(recognizer, clock, open_audio(path, recognizer.sample_rate), chunk_samples,
                                 display, hotwords)
        except ValueError as error:
            print(f"streamssl stream: error: {error}", file=sys.stderr)
            failed.append({"file": path, "error": str(error)})
            continue
        streams.append(stream)
        results.append({"file": path, "audio_s": stream.samples_in / recognizer.sample_rate, "transcript": stream.text,
                        "words": [{"text": w.text, "start_s": w.start_s, "end_s": w.end_s,
                                   "delay_ms": 1000 * w.delay_s, "confidence": w.confidence}
                                  for w in stream.words]})
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


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (any rate or channel count)")
    add_model_arguments(parser)
    add_chunk_ms(parser, export_default=True)
    parser.add_argument("--realtime", action="store_true", help="feed at real-time pace, sleeping between chunks")
    add_threads(parser)
    parser.add_argument("--json", action="store_true",
                        help="machine-readable transcripts and report on stdout (the partial transcripts go to "
                             "stderr)")
    parser.add_argument("--quiet", action="store_true", help="with --json, no partial transcripts on stderr")
    add_decoder_arguments(parser, default="greedy")
    parser.add_argument("--hotwords", metavar="FILE", help="phrases to favour, one a line (words outside the "
                                                           "lexicon are added); needs --decoder lexicon")
    parser.set_defaults(func=cmd_stream)


def add_commands(sub: Subcommands) -> None:
    sub.add_parser(
        "stream", arguments=_arguments, help="recognise audio files chunk by chunk and report latency",
        description="Stream audio files through a fine-tuned CTC checkpoint (or its export, --model) chunk by chunk, show the partial "
                    "transcript as it grows, then print a latency report: declared algorithmic latency, "
                    "compute per chunk, real-time factor and emission delay per word. Without --realtime the "
                    "files are fed as fast as the CPU allows on a clock that skips the waits between chunks, "
                    "so emission delays are still those of live audio.")
