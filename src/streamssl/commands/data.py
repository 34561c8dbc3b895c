"""``streamssl corpus``: write a manifest (JSONL or a Lhotse cut manifest), write Lhotse Shar shards, check a
corpus, synthesise a spoken corpus."""

from __future__ import annotations

import argparse
import json
import sys

from streamssl.commands.common import Subcommands


def cmd_manifest(args: argparse.Namespace) -> int:
    from streamssl.data.lhotse import CUTS_SUFFIX, audio_file, write_cuts
    from streamssl.data.manifest import write_manifest
    from streamssl.data.readers import load_utterances

    suffix = CUTS_SUFFIX if args.format == "lhotse" else ".jsonl"
    if not args.out.endswith(suffix) or args.format == "jsonl" and args.out.endswith(CUTS_SUFFIX):
        raise ValueError(f"--out {args.out}: a {args.format} manifest is a {suffix} file")
    utterances = load_utterances(args.src, skip_bad=args.skip_bad, decode=not args.headers_only)
    if args.format == "lhotse":
        write_cuts(utterances, args.out)
    else:
        for utt in utterances:
            audio_file(utt)
        write_manifest(utterances, args.out)
    hours = sum(utt.duration for utt in utterances) / 3600
    print(f"wrote {len(utterances)} utterance(s), {hours:.3f} h, to {args.out}")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from streamssl.data.lhotse import write_shar
    from streamssl.data.readers import load_utterances

    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {args.shard_size}")
    utterances = load_utterances(args.src, skip_bad=args.skip_bad, decode=not args.headers_only)
    shards = write_shar(utterances, args.out, shard_size=args.shard_size, seed=args.seed)
    hours = sum(utt.duration for utt in utterances) / 3600
    print(f"wrote {len(utterances)} utterance(s), {hours:.3f} h, in {len(shards)} Lhotse Shar shard(s) to {args.out}")
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
                                varied_noise=args.varied_noise, workers=args.workers, sentences=args.sentences,
                                splits=tuple(args.splits) if args.splits else None)
    print(json.dumps(summary, indent=2))
    return 0


def add_commands(subparsers: Subcommands) -> None:
    """Register ``corpus manifest``, ``corpus shard``, ``corpus check`` and ``corpus synth``."""
    subparsers.add_parser("corpus", arguments=_corpus_arguments,
                          help="speech corpora: manifests, shards, checks, a synthetic corpus")


def _corpus_arguments(corpus: argparse.ArgumentParser) -> None:
    sub = corpus.add_subparsers(dest="corpus_command", required=True)

    def source_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--skip-bad", action="store_true",
                            help="leave out utterances with problems (listed as warnings) instead of failing")
        parser.add_argument("--headers-only", action="store_true",
                            help="read audio headers only instead of decoding every file (faster; truncated "
                                 "audio behind a valid header then goes unnoticed)")

    manifest = sub.add_parser("manifest", help="write a JSONL or Lhotse manifest of a corpus (LibriSpeech-layout "
                                               "or audio+.txt folder, or another manifest)")
    manifest.add_argument("src", help="corpus folder, .jsonl manifest, Lhotse .jsonl.gz cut manifest or Shar folder")
    manifest.add_argument("--out", required=True, help="manifest to write (FILE.jsonl, or FILE.jsonl.gz with "
                                                       "--format lhotse)")
    manifest.add_argument("--format", choices=("jsonl", "lhotse"), default="jsonl",
                          help="jsonl: this toolkit's manifest (default); lhotse: a Lhotse CutSet (needs the "
                               "lhotse extra)")
    source_arguments(manifest)
    manifest.set_defaults(func=cmd_manifest)

    shard = sub.add_parser("shard", help="write a corpus as Lhotse Shar tar shards (FLAC audio), shuffled, for "
                                         "sequential reads at scale (needs the lhotse extra)")
    shard.add_argument("src", help="corpus folder, .jsonl manifest, Lhotse .jsonl.gz cut manifest or Shar folder")
    shard.add_argument("--out", required=True, help="new folder for the shards")
    shard.add_argument("--shard-size", type=int, default=1000, metavar="N", help="utterances per shard (default 1000)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    source_arguments(shard)
    shard.set_defaults(func=cmd_shard)

    check = sub.add_parser("check", help="list every problem of a corpus; exit status 1 if there is any, or if "
                                         "the corpus holds no utterances")
    check.add_argument("src", help="corpus folder, .jsonl manifest, Lhotse .jsonl.gz cut manifest or Shar folder")
    check.add_argument("--headers-only", action="store_true",
                       help="read audio headers only instead of decoding every file (faster, finds less)")
    check.set_defaults(func=cmd_check)

    synth = sub.add_parser("synth", help="synthesise an English corpus with eSpeak NG (LibriSpeech layout + manifests)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--hours", type=float, required=True, help="hours of audio to produce")
    synth.add_argument("--seed", type=int, required=True, help="the same seed gives byte-identical output")
    text = synth.add_mutually_exclusive_group()
    text.add_argument("--text", help="UTF-8 text file whose lines are spoken (default: generated sentences)")
    text.add_argument("--sentences", action="store_true",
                      help="speak coherent English sentences from chatterbot-corpus, each at most once while they "
                           "last (pip install 'streamssl[sentences]')")
    synth.add_argument("--splits", nargs="+", choices=("train", "dev", "test"),
                       help="synthesise only these splits of the corpus that --hours and --seed describe (same "
                            "speakers and amounts; e.g. --splits test: a tenth of --hours)")
    synth.add_argument("--snr-db", type=float, help="add white noise at this signal-to-noise ratio (dB)")
    synth.add_argument("--varied-noise", action="store_true",
                       help="add white, pink or brown noise at 5-25 dB SNR to half of the utterances")
    synth.add_argument("--workers", type=int, help="worker processes (default: all CPU cores)")
    synth.set_defaults(func=cmd_synth)
