"""``streamssl corpus``: write a manifest, check a corpus, synthesise a spoken corpus."""

from __future__ import annotations

import argparse
import json
import sys

from streamssl.commands.common import Subcommands


def cmd_manifest(args: argparse.Namespace) -> int:
    from streamssl.data.manifest import write_manifest
    from streamssl.data.readers import load_utterances

    utterances = load_utterances(args.src, skip_bad=args.skip_bad, decode=not args.headers_only)
    write_manifest(utterances, args.out)
    hours = sum(utt.duration for utt in utterances) / 3600
    print(f"wrote {len(utterances)} utterance(s), {hours:.3f} h, to {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from streamssl.data.check import check_report

    scan, lines = check_report(args.src, decode=not args.headers_only, progress=True)
    print("\n".join(lines))
    if not scan.utterances and not scan.problems:
        print(f"streamssl corpus check: error: {args.src} holds no utterances (no audio files or transcripts "
              "found)", file=sys.stderr)
    return 1 if scan.problems or not scan.utterances else 0


def cmd_synth(args: argparse.Namespace) -> int:
    from streamssl.data.synth import synthesize_corpus

    summary = synthesize_corpus(args.out, args.hours, args.seed, text_file=args.text, noise_snr_db=args.snr_db,
                                varied_noise=args.varied_noise,
                                workers=args.workers)
    print(json.dumps(summary, indent=2))
    return 0


def add_commands(subparsers: Subcommands) -> None:
    """Register ``corpus manifest``, ``corpus check`` and ``corpus synth``."""
    subparsers.add_parser("corpus", arguments=_corpus_arguments,
                          help="speech corpora: manifests, checks, a synthetic corpus")


def _corpus_arguments(corpus: argparse.ArgumentParser) -> None:
    sub = corpus.add_subparsers(dest="corpus_command", required=True)

    manifest = sub.add_parser("manifest", help="write a JSONL manifest of a LibriSpeech-layout or audio+.txt folder")
    manifest.add_argument("src", help="corpus folder (or a .jsonl manifest to rewrite)")
    manifest.add_argument("--out", required=True, help="manifest to write (FILE.jsonl)")
    manifest.add_argument("--skip-bad", action="store_true",
                          help="leave out utterances with problems (listed as warnings) instead of failing")
    manifest.add_argument("--headers-only", action="store_true",
                          help="read audio headers only instead of decoding every file (faster; truncated "
                               "audio behind a valid header then goes unnoticed)")
    manifest.set_defaults(func=cmd_manifest)

    check = sub.add_parser("check", help="list every problem of a corpus; exit status 1 if there is any, or if "
                                         "the corpus holds no utterances")
    check.add_argument("src", help="corpus folder or .jsonl manifest")
    check.add_argument("--headers-only", action="store_true",
                       help="read audio headers only instead of decoding every file (faster, finds less)")
    check.set_defaults(func=cmd_check)

    synth = sub.add_parser("synth", help="synthesise an English corpus with eSpeak NG (LibriSpeech layout + manifests)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--hours", type=float, required=True, help="hours of audio to produce")
    synth.add_argument("--seed", type=int, required=True, help="the same seed gives byte-identical output")
    synth.add_argument("--text", help="UTF-8 text file whose lines are spoken (default: generated sentences)")
    synth.add_argument("--snr-db", type=float, help="add white noise at this signal-to-noise ratio (dB)")
    synth.add_argument("--varied-noise", action="store_true",
                       help="add white, pink or brown noise at 5-25 dB SNR to half of the utterances")
    synth.add_argument("--workers", type=int, help="worker processes (default: all CPU cores)")
    synth.set_defaults(func=cmd_synth)
