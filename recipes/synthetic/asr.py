"""The best streaming recogniser this CPU recipe can train: LLSA at 160 ms declared encoder look-ahead,
with full attention (offline) beside it, on a synthetic corpus with many voices and noise.

    python recipes/synthetic/asr.py --out runs/synthetic-asr [--hours 10] [--steps 7000] [--mixers llsa full] \
        [--lm runs/lm/sotu3wf.arpa]

1. synthesise ``--hours`` of eSpeak NG speech (general English text, every English voice x variant,
   white/pink/brown noise at 5-25 dB on half the utterances; speakers disjoint across splits);
2. train a CTC model per mixer from scratch on the ``fbank`` frontend (``asr.yaml``), with speed
   perturbation, evaluating on the dev split every ``eval_every`` steps;
3. evaluate each on the test split: offline with greedy CTC, the lexicon beam search (wordfreq unigrams) and,
   with ``--lm``, the lexicon search with that ARPA word LM (``streamssl lm build``); streaming (40 ms chunks,
   greedy); write a Markdown table (between the ``ASR-RECIPE`` markers of ``--table``) and a plot of the
   learning curves.

Every step resumes: a finished run is reused, an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from streamssl.asr.evaluate import evaluate_model
from streamssl.asr.lexicon import BeamSearchConfig
from streamssl.data import load_utterances, synthesize_corpus
from streamssl.train.api import build_config, run_training
from streamssl.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
SEED = 5
STREAM_CHUNK_MS = 40.0
# The 3-gram's weights chosen on the demo's dev split (docs/decoding.md); the unigram search keeps its defaults.
LM_WEIGHT, LM_WORD_SCORE = 0.4, 0.0


def train_mixer(mixer: str, out: Path, corpus: Path, steps: int | None) -> Path:
    sets = [("encoder.mixer", mixer)]
    if mixer == "full":
        sets.append(("encoder.left_frames", None))
    config = build_config("finetune", "base", str(HERE / "asr.yaml"), sets, train_data=str(corpus / "train.jsonl"),
                          dev_data=str(corpus / "dev.jsonl"), steps=steps)
    run_dir = out / mixer
    run_training("finetune", config, str(run_dir))
    return run_dir


def read_curve(path: Path, column: str) -> tuple[list[int], list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, cer_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for mixer, run_dir in runs.items():
        loss_ax.plot(*read_curve(run_dir / "train.csv", "ctc_per_char"), label=mixer, alpha=0.8)
        steps, cer = read_curve(run_dir / "eval.csv", "dev_cer")
        cer_ax.plot(steps, [100 * c for c in cer], marker="o", label=f"{mixer} CER")
        steps, wer = read_curve(run_dir / "eval.csv", "dev_wer")
        cer_ax.plot(steps, [100 * w for w in wer], marker="x", linestyle="--", label=f"{mixer} WER")
    loss_ax.set(xlabel="step", ylabel="CTC loss per character", title="training loss")
    cer_ax.set(xlabel="step", ylabel="%", title="dev error rates")
    for ax in (loss_ax, cer_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def write_table(path: Path, rows: list[dict], hours: float) -> str:
    lines = [f"Corpus: {hours:g} h synthetic (80/10/10 % train/dev/test, disjoint speakers). Test split; "
             "WER / CER % with greedy CTC, the lexicon search (wordfreq unigrams) and the lexicon search with "
             "the word LM (`--lm`).", "",
             "| mixer | declared latency (frontend + encoder) | greedy | lexicon | lexicon + LM | streaming greedy "
             "WER % (40 ms chunks) | streaming == offline | training steps | training time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        latency = "whole utterance" if r["latency_ms"] is None else f"{r['latency_ms']:.0f} ms"
        streaming = "n/a (offline)" if r["streaming_wer"] is None else f"{100 * r['streaming_wer']:.1f}"
        same = "n/a" if r["same"] is None else f"{r['same']}/{r['utterances']}"
        scores = [f"{100 * r[f'{d}_wer']:.1f} / {100 * r[f'{d}_cer']:.1f}" if r.get(f"{d}_wer") is not None else "n/a"
                  for d in ("greedy", "lexicon", "lm")]
        lines.append(f"| {r['mixer']} | {latency} | {' | '.join(scores)} | {streaming} | "
                     f"{same} | {r['steps']} | {r['train_minutes']:.0f} min |")
    table = "\n".join(lines)
    text = path.read_text() if path.exists() else ""
    if "<!-- ASR-RECIPE -->" not in text:
        text += "\n<!-- ASR-RECIPE -->\n<!-- /ASR-RECIPE -->\n"
    start, end = text.index("<!-- ASR-RECIPE -->"), text.index("<!-- /ASR-RECIPE -->")
    path.write_text(text[:start] + "<!-- ASR-RECIPE -->\n" + table + "\n" + text[end:])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=10.0, help="synthetic corpus size")
    parser.add_argument("--mixers", nargs="+", default=["llsa", "full"])
    parser.add_argument("--steps", type=int, help="override asr.yaml's training steps")
    parser.add_argument("--lm", help="an ARPA word LM (streamssl lm build) for the lexicon + LM column")
    parser.add_argument("--out", default="runs/synthetic-asr")
    parser.add_argument("--table", default="docs/results.md")
    parser.add_argument("--plot", default="docs/results/asr_recipe_curves.png")
    args = parser.parse_args()

    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "test.jsonl").exists():
        print(synthesize_corpus(corpus, args.hours, seed=SEED, varied_noise=True))
    test = load_utterances(corpus / "test.jsonl")
    rows, runs = [], {}
    for mixer in args.mixers:
        runs[mixer] = train_mixer(mixer, out, corpus, args.steps)
        elapsed = json.loads((runs[mixer] / "summary.json").read_text())
        model = load_checkpoint(runs[mixer], kind="finetune").model
        offline = evaluate_model(model, test)
        lexicon = evaluate_model(model, test, beam=BeamSearchConfig())
        lm = None if args.lm is None else evaluate_model(
            model, test, beam=BeamSearchConfig(lm=args.lm, lm_weight=LM_WEIGHT, word_score=LM_WORD_SCORE))
        streaming = None if model.stream_error() else evaluate_model(model, test, streaming=True,
                                                                    chunk_ms=STREAM_CHUNK_MS)
        same = None if streaming is None else sum(a[2] == b[2] for a, b in zip(offline.hypotheses,
                                                                                 streaming.hypotheses))
        rows.append({"mixer": mixer, "latency_ms": offline.latency["total_lookahead_ms"],
                     "greedy_wer": offline.wer, "greedy_cer": offline.cer, "lexicon_wer": lexicon.wer,
                     "lexicon_cer": lexicon.cer, "lm_wer": None if lm is None else lm.wer,
                     "lm_cer": None if lm is None else lm.cer,
                     "streaming_wer": None if streaming is None else streaming.wer,
                     "same": same, "utterances": len(test), "steps": elapsed["step"],
                     "train_minutes": read_curve(runs[mixer] / "train.csv", "elapsed_s")[1][-1] / 60})
        print(json.dumps(rows[-1]))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_curves(runs, Path(args.plot))
    print(write_table(Path(args.table), rows, args.hours))


if __name__ == "__main__":
    main()
