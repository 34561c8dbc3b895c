"""The low-resource experiment: does self-supervised pretraining on unlabelled speech help a recogniser
that has 30 minutes of labels from other speakers?

    python recipes/lowresource/run.py --out runs/lowresource --threads 1 --jobs 2  # both mixers; time: README.md
    python recipes/lowresource/run.py --out /tmp/lr --scale 0.02        # the same pipeline in minutes

1. synthesise a corpus (eSpeak NG, speakers disjoint across splits): its ``train`` split (10 h at
   scale 1) is the unlabelled pretraining audio; 30 min of the ``dev`` split's speakers are the labels
   (the rest of those speakers' audio is the dev data of every run); ``test`` (other speakers) scores;
2. for each mixer (LLSA and full attention): pretrain with wav2vec 2.0 and with BEST-RQ;
3. fine-tune with CTC on the labels: from scratch, from each pretrained encoder, and frozen (only the
   head trains: the representation probe; the frozen scratch encoder is the random-feature baseline);
4. score every model on the test split and write a table and the pretraining curves.

Every run resumes from its checkpoint, and finished runs and scores are reused, so a killed recipe
continues where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from streamssl.asr.evaluate import evaluate_model
from streamssl.data import load_utterances, synthesize_corpus, write_manifest
from streamssl.train.api import build_config, run_training
from streamssl.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
OBJECTIVES = ("wav2vec2", "bestrq")
CORPUS_HOURS = 12.5        # 80 % of it, 10 h, is the train split
LABEL_HOURS = 0.5
DEV_HOURS = 0.1
CORPUS_SEED = 0
# The frozen-encoder probe compares encoders rather than making a recogniser; it keeps the first recipe's 1500
# steps so that both mixers fit the recipe's two hours.
PROBE_STEPS = 1500


def scaled(value: int, scale: float, least: int) -> int:
    return max(least, round(value * scale))


def prepare_corpus(out: Path, scale: float) -> dict[str, str]:
    """Manifests: ``unlabelled`` (train split), ``labels`` and ``dev`` (dev-split speakers), ``test``."""
    corpus = out / "corpus"
    if not (corpus / "test.jsonl").exists():
        print(json.dumps(synthesize_corpus(corpus, CORPUS_HOURS * scale, seed=CORPUS_SEED)))
    labels, dev = corpus / "labels.jsonl", corpus / "labels_dev.jsonl"
    if not labels.exists():
        pool = load_utterances(corpus / "dev.jsonl")
        random.Random(CORPUS_SEED).shuffle(pool)
        held, seconds = [], 0.0
        while pool and seconds < DEV_HOURS * scale * 3600:
            held.append(pool.pop())
            seconds += held[-1].duration
        chosen, seconds = [], 0.0
        while pool and seconds < LABEL_HOURS * scale * 3600:
            chosen.append(pool.pop())
            seconds += chosen[-1].duration
        write_manifest(sorted(held, key=lambda u: u.id), dev)
        write_manifest(sorted(chosen, key=lambda u: u.id), labels)
    return {"unlabelled": str(corpus / "train.jsonl"), "labels": str(labels), "dev": str(dev),
            "test": str(corpus / "test.jsonl")}


def settings(name: str) -> dict:
    return yaml.safe_load((HERE / name).read_text())


def encoder_sets(mixer: str) -> list[tuple[str, object]]:
    return [("encoder.mixer", mixer)]


def pretrain(out: Path, data: dict[str, str], mixer: str, objective: str, scale: float) -> Path:
    cfg = settings(f"pretrain_{objective}.yaml")
    steps = scaled(cfg["steps"], scale, 4)
    sets = encoder_sets(mixer) + [("warmup_steps", max(1, round(cfg["warmup_steps"] * steps / cfg["steps"]))),
                                  ("eval_every", max(1, round(cfg["eval_every"] * steps / cfg["steps"])))]
    config = build_config("pretrain", "base", str(HERE / f"pretrain_{objective}.yaml"), sets,
                          train_data=data["unlabelled"], dev_data=data["dev"], steps=steps)
    run_dir = out / mixer / f"pretrain-{objective}"
    run_training("pretrain", config, str(run_dir), progress=False)
    return run_dir


def finetune(out: Path, data: dict[str, str], mixer: str, init: Path | None, mode: str, scale: float,
             name: str) -> Path:
    cfg = settings("finetune.yaml")
    unscaled_steps = PROBE_STEPS if mode == "frozen" else cfg["steps"]
    steps = scaled(unscaled_steps, scale, 4)
    ratio = steps / cfg["steps"]
    sets = [("warmup_steps", max(1, round(cfg["warmup_steps"] * ratio))), ("train_mode", mode),
            ("eval_every", max(1, round(cfg["eval_every"] * ratio))),
            # Only a pretrained encoder has anything to protect from the fresh head's first gradients.
            ("freeze_encoder_steps", round(cfg["freeze_encoder_steps"] * ratio)
             if init is not None and mode == "full" else 0)]
    if init is None:
        sets += [("encoder", {**settings(f"pretrain_{OBJECTIVES[0]}.yaml")["encoder"], "mixer": mixer})]
    config = build_config("finetune", "base", str(HERE / "finetune.yaml"), sets, train_data=data["labels"],
                          dev_data=data["dev"], init=str(init) if init is not None else None, steps=steps)
    run_dir = out / mixer / f"finetune-{name}"
    run_training("finetune", config, str(run_dir), progress=False)
    return run_dir


def score(run_dir: Path, test: list) -> dict:
    cached = run_dir / "test_scores.json"
    if cached.exists():
        return json.loads(cached.read_text())
    result = evaluate_model(load_checkpoint(run_dir, kind="finetune").model, test)
    scores = {"wer": result.wer, "cer": result.cer}
    cached.write_text(json.dumps(scores) + "\n")
    return scores


def pretrain_health(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text()).get("health", {})


def curves(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = []
    for name in ("train.csv", "eval.csv"):
        path = run_dir / name
        rows.append(list(csv.DictReader(path.open())) if path.exists() else [])
    return rows[0], rows[1]


def plot_curves(pretrain_dirs: dict[tuple[str, str], Path], path: Path) -> None:
    """Dev accuracy against its chance level over pretraining steps, one panel per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(5 * len(OBJECTIVES), 3.6), squeeze=False)
    for ax, objective in zip(axes[0], OBJECTIVES):
        for (mixer, obj), run_dir in pretrain_dirs.items():
            if obj != objective:
                continue
            train, dev = curves(run_dir)
            line, = ax.plot([int(r["step"]) for r in train], [float(r["accuracy"]) for r in train], alpha=0.5,
                            label=f"{mixer} train")
            if dev:
                steps = [int(r["step"]) for r in dev]
                ax.plot(steps, [float(r["dev_accuracy"]) for r in dev], "o-", color=line.get_color(),
                        label=f"{mixer} dev")
                ax.plot(steps, [float(r["dev_chance"]) for r in dev], ":", color=line.get_color(),
                        label=f"{mixer} dev chance")
        ax.set_title(f"{objective} pretraining")
        ax.set_xlabel("step")
        ax.set_ylabel("masked-frame accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| mixer | encoder from | fine-tuning | pretraining dev accuracy / chance | test WER % | test CER % "
             "| CER gain over scratch (same mode) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        health = r.get("pretrain_health") or {}
        acc = (f"{100 * health['accuracy']:.1f} % / {100 * health['chance']:.1f} % "
               f"({health['accuracy_over_chance']:.1f}x)" if health else "-")
        gain = "-" if r["gain"] is None else f"{100 * r['gain']:+.1f} %"
        lines.append(f"| {r['mixer']} | {r['init']} | {r['mode']} | {acc} | {100 * r['wer']:.1f} | "
                     f"{100 * r['cer']:.1f} | {gain} |")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    marker, end_marker = "<!-- LOWRESOURCE -->", "<!-- /LOWRESOURCE -->"
    current = path.read_text() if path.exists() else ""
    if marker not in current:
        current = current.rstrip("\n") + f"\n\n{marker}\n{end_marker}\n"
    start, end = current.index(marker), current.index(end_marker)
    path.write_text(current[:start] + marker + "\n" + text + "\n" + current[end:])


def run_mixer(out: Path, data: dict[str, str], mixer: str, scale: float,
              threads: int | None) -> tuple[list[dict], dict[tuple[str, str], Path]]:
    """Pretrain, fine-tune and score one mixer: its table rows and its pretraining run folders."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    test = load_utterances(data["test"])
    rows, pretrained = [], {}
    for objective in OBJECTIVES:
        pretrained[(mixer, objective)] = pretrain(out, data, mixer, objective, scale)
    scratch = {}
    for mode in ("full", "frozen"):
        for init in ("scratch",) + OBJECTIVES:
            source = None if init == "scratch" else pretrained[(mixer, init)]
            run_dir = finetune(out, data, mixer, source, mode, scale, f"{init}-{mode}")
            scores = score(run_dir, test)
            if init == "scratch":
                scratch[mode] = scores["cer"]
            gain = None if init == "scratch" else (scratch[mode] - scores["cer"]) / max(scratch[mode], 1e-9)
            rows.append({"mixer": mixer, "init": init, "mode": mode, **scores, "gain": gain,
                         "pretrain_health": pretrain_health(source) if source is not None else None})
            print(json.dumps(rows[-1]), flush=True)
    return rows, pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lowresource")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink corpus, labels and every run's steps by this factor (0.02: a smoke test)")
    parser.add_argument("--mixers", nargs="+", default=["llsa", "full"])
    parser.add_argument("--table", help="Markdown file whose LOWRESOURCE section gets the table "
                                        "(e.g. docs/results.md); default: only OUT/results.md")
    parser.add_argument("--plot", help="PNG of the pretraining curves (default: OUT/pretraining.png)")
    parser.add_argument("--threads", type=int, help="torch threads; 1 on a machine other jobs share (measured: "
                                                    "a step took 25 s with 2 threads under a load of 8, 0.1 s with 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="mixers run side by side in this many processes of --threads threads each "
                             "(2 on 2 cores)")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    out = Path(args.out)
    data = prepare_corpus(out, args.scale)
    work = [(out, data, mixer, args.scale, args.threads) for mixer in args.mixers]
    if args.jobs == 1:
        done = [run_mixer(*w) for w in work]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_mixer, *zip(*work)))
    rows = [row for mixer_rows, _ in done for row in mixer_rows]
    pretrained = {key: path for _, dirs in done for key, path in dirs.items()}
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot = Path(args.plot) if args.plot else out / "pretraining.png"
    plot_curves(pretrained, plot)
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    if args.table:
        write_section(Path(args.table), text)
    print(text)
    print(f"pretraining curves: {plot}")


if __name__ == "__main__":
    main()
