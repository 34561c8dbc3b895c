"""Compare mixers at matched declared latency on synthetic speech: pretrain, fine-tune (from the
pretrained encoder and from scratch), evaluate on the test split, write a Markdown table.

    python recipes/synthetic/run.py --hours 0.5 --mixers full maa sa llsa --latency-frames 6 \
        --out runs/synthetic --table docs/results.md

Every mixer registered in ``streamssl.mixers.MIXERS`` can be named. Each streaming mixer gets the
smallest uniform ``right_frames`` whose declared encoder look-ahead is at least ``--latency-frames``
(MAA/SA compound it over layers; LLSA does not); ``full`` is offline. Runs resume: finished steps
are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from streamssl.asr.evaluate import evaluate_model
from streamssl.config import EncoderConfig
from streamssl.data import load_utterances, synthesize_corpus
from streamssl.encoder import declared_latency
from streamssl.mixers import MIXERS
from streamssl.train.api import build_config, run_training
from streamssl.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
ORDER = ["full", "maa", "sa", "llsa", "amtrf", "emformer", "summary", "wsm"]


def matched_encoder(mixer: str, target_frames: int) -> dict:
    """Encoder fields of pretrain.yaml for ``mixer`` with declared look-ahead matched to ``target_frames``."""
    base = yaml.safe_load((HERE / "pretrain.yaml").read_text())["encoder"]
    best = None
    for right in range(0, target_frames + 1):
        fields = {**base, "mixer": mixer, "right_frames": right}
        lookahead = declared_latency(EncoderConfig.from_dict(fields)).encoder_lookahead_frames
        if lookahead is None:  # offline: latency is the utterance whatever right_frames is
            return fields
        if best is None or abs(lookahead - target_frames) < abs(best[1] - target_frames):
            best = (fields, lookahead)
        if lookahead >= target_frames:
            break
    return best[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=0.5, help="synthetic corpus size")
    parser.add_argument("--mixers", nargs="+", default=[m for m in ORDER if m in MIXERS])
    parser.add_argument("--latency-frames", type=int, default=6, help="declared encoder look-ahead to match")
    parser.add_argument("--pretrain-steps", type=int, help="override pretrain.yaml's steps")
    parser.add_argument("--finetune-steps", type=int, help="override finetune.yaml's steps")
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baselines")
    parser.add_argument("--out", default="runs/synthetic")
    parser.add_argument("--table", default="docs/results.md", help="Markdown file for the table (its "
                        "section between the RESULTS markers is replaced)")
    args = parser.parse_args()
    unknown = [m for m in args.mixers if m not in MIXERS]
    if unknown:
        parser.error(f"unregistered mixers {unknown}; registered: {sorted(MIXERS)}")

    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "test.jsonl").exists():
        print(synthesize_corpus(corpus, args.hours, seed=0))
    train, dev, test = (str(corpus / f"{s}.jsonl") for s in ("train", "dev", "test"))
    test_utts = load_utterances(test)
    rows = []
    for mixer in args.mixers:
        encoder = matched_encoder(mixer, args.latency_frames)
        started = time.perf_counter()
        pre_sets = [(f"encoder.{k}", v) for k, v in encoder.items() if k in ("mixer", "right_frames")]
        pretrain = build_config("pretrain", "base", str(HERE / "pretrain.yaml"), pre_sets, train_data=train,
                                steps=args.pretrain_steps)
        run_training("pretrain", pretrain, str(out / mixer / "pretrain"))
        variants = [("pretrained", [], str(out / mixer / "pretrain"))]
        if not args.no_scratch:
            variants.append(("scratch", [("encoder", encoder)], None))
        for name, sets, init in variants:
            finetune = build_config("finetune", "base", str(HERE / "finetune.yaml"), sets, train_data=train,
                                    dev_data=dev, init=init, steps=args.finetune_steps)
            run_training("finetune", finetune, str(out / mixer / f"finetune-{name}"))
            model = load_checkpoint(out / mixer / f"finetune-{name}", kind="finetune").model
            result = evaluate_model(model, test_utts)
            rows.append({"mixer": mixer, "init": name, "right_frames": encoder["right_frames"],
                         "latency_ms": result.latency["total_lookahead_ms"], "wer": result.wer, "cer": result.cer,
                         "rtf": result.rtf})
            print(json.dumps(rows[-1]))
        for row in rows[-len(variants):]:
            row["mixer_minutes"] = round((time.perf_counter() - started) / 60, 1)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_table(Path(args.table), rows, args)


def write_table(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    lines = ["| mixer | right_frames | declared latency | fine-tuned from | test WER % | test CER % | RTF (offline) "
             "| wall time, all runs of the mixer |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        latency = "whole utterance" if r["latency_ms"] is None else f"{r['latency_ms']:.0f} ms"
        lines.append(f"| {r['mixer']} | {r['right_frames']} | {latency} | {r['init']} | {100 * r['wer']:.1f} | "
                     f"{100 * r['cer']:.1f} | {r['rtf']:.3f} | {r['mixer_minutes']} min |")
    table = "\n".join(lines)
    text = path.read_text() if path.exists() else "<!-- RESULTS -->\n<!-- /RESULTS -->\n"
    start, end = text.index("<!-- RESULTS -->"), text.index("<!-- /RESULTS -->")
    path.write_text(text[:start] + "<!-- RESULTS -->\n" + table + "\n" + text[end:])
    print(table)


if __name__ == "__main__":
    main()
