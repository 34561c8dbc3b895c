"""``streamssl pretrain``, ``streamssl finetune`` and ``streamssl evaluate``.

A run's configuration is built in layers: ``--preset`` (``base``: wav2vec 2.0 BASE; ``cpu-small``;
``tiny``), then the ``--config`` YAML file, then ``--set KEY=VALUE`` flags (``encoder.KEY`` for encoder
fields), then the named flags (``--train``, ``--steps``...). ``torchrun --nproc-per-node N -m streamssl
pretrain ...`` trains with DDP.

The commands only parse arguments: :mod:`streamssl.train.api` builds the configuration and runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from streamssl.commands.common import (
    Subcommands, add_chunk_ms, add_decoder_arguments, add_quiet, add_threads, beam_config, check_chunk, use_threads)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _add_run_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    from streamssl.train.config import PRESETS

    parser.add_argument("--config", help=f"YAML file of {'PretrainConfig' if kind == 'pretrain' else 'FinetuneConfig'} "
                                         "fields (encoder fields under 'encoder:')")
    parser.add_argument("--preset", choices=sorted(PRESETS[kind]),
                        help="starting values: base (the wav2vec 2.0 BASE recipe, meant for GPUs), cpu-small "
                             "(minutes on a CPU) or tiny (seconds, for tests); required unless --config is "
                             "given, which then starts from base")
    parser.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        dest="sets", help="override one field (encoder.KEY for the encoder, objective_options.KEY "
                             "for the pretraining objective's options); repeatable")
    parser.add_argument("--train", dest="train_data", help="training data: manifest, LibriSpeech or audio+txt folder, "
                                                           "Lhotse cut manifest (.jsonl.gz) or Shar folder")
    parser.add_argument("--dev", dest="dev_data", help="dev data, evaluated every eval_every steps and at the end")
    parser.add_argument("--steps", type=int, help="optimiser updates in the whole run")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--skip-bad", action="store_true", default=None,
                        help="skip (and report) utterances that fail corpus check instead of stopping")
    parser.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="checkpoint and stop at this step (resume later with the same command)")
    add_threads(parser, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_train(kind: str):
    def command(args: argparse.Namespace) -> int:
        from streamssl.train.api import build_config, run_training, starting_preset

        use_threads(args.threads)
        flags = dict(train_data=args.train_data, dev_data=args.dev_data, steps=args.steps, lr=args.lr,
                     seed=args.seed, skip_bad=args.skip_bad)
        if kind == "finetune":
            flags.update(init=args.init, head=args.head, **_train_mode_flags(args))
        config = build_config(kind, starting_preset(kind, args.preset, args.config), args.config, args.sets,
                              **flags)
        if kind == "finetune" and args.mixer and config.train_mode != "replace":
            raise ValueError(f"--mixer {args.mixer} is the mixer of the layers --replace LAYERS replaces, but this "
                             f"run replaces none (train_mode {config.train_mode!r}): add --replace or drop --mixer")
        metrics = run_training(kind, config, args.out, args.device, args.stop_after, not args.no_progress)
        if int(os.environ.get("RANK", "0")) == 0:
            shown = {k: round(v, 4) for k, v in metrics.items()}
            print(f"{kind} run {args.out}: {shown}")
        return 0

    return command


def _train_mode_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``FinetuneConfig`` fields of ``--full``, ``--frozen``, ``--replace LAYERS`` and ``--mixer``."""
    flags: dict[str, Any] = {}
    if args.full:
        flags["train_mode"] = "full"
    elif args.frozen:
        flags["train_mode"] = "frozen"
    elif args.replace:
        flags.update(train_mode="replace", replace_layers=args.replace)
    if args.mixer:
        flags["replace_mixer"] = args.mixer
    return flags


def cmd_evaluate(args: argparse.Namespace) -> int:
    from streamssl.asr.evaluate import evaluate_model
    from streamssl.tables import results_table
    from streamssl.train.checkpoint import load_checkpoint
    from streamssl.train.data import load_split, spellable
    from streamssl.train.dist import pick_device

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    use_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    def stage(message: str) -> None:
        if not args.quiet:
            print(f"evaluate: {message}", file=sys.stderr, flush=True)

    # The data is checked before any model is built, so a bad corpus fails fast and names its files.
    stage(f"checking {args.data}")
    utterances = load_split(args.data, args.skip_bad, "evaluation data", log=log)
    checkpoint = load_checkpoint(args.checkpoint, kind="finetune")
    model = checkpoint.model
    if args.streaming:
        if model.stream_error() is not None:
            raise ValueError(model.stream_error())
        check_chunk(args.chunk_ms, model.hop_samples, model.sample_rate)
    utterances = spellable(utterances, model.vocab, args.skip_bad, "evaluation data", args.data, log)
    device = pick_device(args.device)
    beam = beam_config(args)
    mode = f"streaming in {args.chunk_ms:g} ms chunks" if args.streaming else "offline"
    threads = f", {args.threads} thread(s)" if device.type == "cpu" else ""
    stage(f"decoding {len(utterances)} utterance(s) ({sum(u.duration for u in utterances):.0f} s of audio) {mode} "
          f"with the {args.decoder} decoder on {device}{threads}")
    result = evaluate_model(model.to(device), utterances, streaming=args.streaming, chunk_ms=args.chunk_ms,
                            device=device, progress=not args.quiet, max_offline_s=args.max_offline_s, beam=beam,
                            batch_size=args.batch_size)
    result.latency["mixer"] = checkpoint.mixer_label  # the model as built: replaced layers included
    if args.json:
        out = result.to_dict()
        if not args.hypotheses:
            out.pop("hypotheses")
        print(json.dumps(out, indent=2))
        return 0
    print(results_table([(checkpoint.mixer_label, result)]))
    if args.hypotheses:
        for utt_id, ref, hyp in result.hypotheses:
            print(f"{utt_id}\n  REF: {ref}\n  HYP: {hyp}")
    return 0


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_arguments(parser, "pretrain")
    parser.set_defaults(func=_cmd_train("pretrain"))


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_arguments(parser, "finetune")
    parser.add_argument("--init", help="checkpoint (or run folder) whose encoder starts the model; "
                                       "omit to train from scratch")
    parser.add_argument("--head", choices=("linear", "lstm"), help="CTC head")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="train the whole model (default)")
    mode.add_argument("--frozen", action="store_true", help="keep the encoder fixed; train only the CTC head")
    mode.add_argument("--replace", metavar="LAYERS", help="selective fine-tuning: replace the attention of LAYERS "
                                                          "('last:K' or 'i,j,...') with fresh --mixer layers and "
                                                          "train only those and the head")
    parser.add_argument("--mixer", help="mixer of the replaced layers with --replace (default wsm)")
    parser.set_defaults(func=_cmd_train("finetune"))


def _evaluate_arguments(evaluate: argparse.ArgumentParser) -> None:
    from streamssl.asr.evaluate import MAX_OFFLINE_SECONDS, STREAMING_BATCH_SIZE

    evaluate.add_argument("--checkpoint", required=True, help="a finetune checkpoint or its run folder")
    evaluate.add_argument("--data", required=True, help="manifest, LibriSpeech or audio+txt folder, Lhotse cut "
                                                        "manifest (.jsonl.gz) or Shar folder")
    evaluate.add_argument("--streaming", action="store_true", help="decode chunk by chunk through step/flush")
    add_chunk_ms(evaluate, "streaming chunk length")
    evaluate.add_argument("--batch-size", type=int, default=STREAMING_BATCH_SIZE, metavar="STREAMS",
                          help="utterances streamed at once with --streaming, each joining as another ends "
                               f"(default {STREAMING_BATCH_SIZE}; transcripts do not depend on it)")
    evaluate.add_argument("--max-offline-s", type=float, default=MAX_OFFLINE_SECONDS, metavar="SECONDS",
                          help="offline mode refuses longer utterances, since it decodes each one whole in "
                               f"memory (default {MAX_OFFLINE_SECONDS:g}; --streaming takes any length)")
    add_decoder_arguments(evaluate, default="lexicon")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    evaluate.add_argument("--skip-bad", action="store_true", help="skip utterances that fail corpus check")
    evaluate.add_argument("--hypotheses", action="store_true", help="also print every reference/hypothesis")
    add_threads(evaluate)
    evaluate.add_argument("--json", action="store_true",
                          help="machine-readable output on stdout (progress still goes to stderr)")
    add_quiet(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def add_commands(sub: Subcommands) -> None:
    sub.add_parser(
        "pretrain", arguments=_pretrain_arguments,
        help="self-supervised pretraining of an encoder (wav2vec 2.0 or BEST-RQ)",
        description="Pretrain a streaming encoder with a self-supervised objective: wav2vec 2.0 (masked spans, "
                    "a Gumbel quantiser, a contrastive loss; the default) or BEST-RQ (objective: bestrq; masked "
                    "log-mel spans, labels from a frozen random-projection quantiser). The configuration is --preset, then the --config YAML "
                    "file (PretrainConfig fields, encoder fields under 'encoder:'), then --set KEY=VALUE, "
                    "then the flags below. Running the same command again resumes from --out; "
                    "torchrun --nproc-per-node N -m streamssl pretrain ... trains with DDP.")
    sub.add_parser(
        "finetune", arguments=_finetune_arguments, help="CTC fine-tuning over characters",
        description="Fine-tune an encoder with CTC over characters: from a streamssl checkpoint or run "
                    "folder (--init), a local Hugging Face wav2vec 2.0 / HuBERT / WavLM model "
                    "(--init hf:DIR), or from scratch. The whole model trains (--full, the default), only "
                    "the head (--frozen), or only fresh layers that replace the attention of some layers "
                    "(--replace). The configuration is built as for pretrain (FinetuneConfig fields).")
    sub.add_parser("evaluate", arguments=_evaluate_arguments,
                   help="CTC decoding (lexicon beam search or greedy): WER, CER, latency, real-time factor")
