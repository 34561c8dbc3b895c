"""Training throughput per frontend: seconds of audio per second of one fwd+bwd+AdamW step.

    python benchmarks/train_throughput.py [--demo-steps 6] [--base-steps 1] [--threads 1] [--smoke]

A character CTC model (linear head) is trained on a batch of random speech-band audio with random
transcripts, at two sizes: the encoder of the ``cpu-small`` preset (what ``streamssl demo`` trains)
and wav2vec 2.0 BASE (12 layers, d_model 768), both with the preset's mixer. Frontends: ``conv``,
``fbank`` at 4x and 2x subsampling, and ``none`` fed precomputed 80-dim frames at 20 ms (the encoder alone:
a floor). At demo size the preset's frontend keeps the preset's options (``fbank``: 144 channels) and the
others take their defaults (``conv``: 512 channels); at BASE every frontend takes its defaults.
After one warm-up step, ``steps`` steps are timed; throughput is audio seconds / process CPU seconds
(on one thread, what the step costs with a core to itself, even on a shared machine), and also / wall
seconds. For ``fbank`` the knf log-mel extraction's share of the step's CPU time is timed apart. Prints a
markdown table; writes JSON and a PNG plot under ``--out``. ``--smoke`` runs the demo size only, one step
of one half-second utterance per frontend.

Then the ways to a faster demo step, each on the demo size's own frontend (``fbank`` 4x) at the demo's
batch (``--variant-batch`` x ``--variant-seconds``: 5 x 4 s, the preset's 20 s), the same seed and data:
``fp32`` (the step above), ``bf16`` (forward under CPU bf16 autocast), ``fused`` (``AdamW(fused=True)``),
``cached`` (log-mel computed once beforehand: what a feature cache, or feature workers, leave in the
training process) and ``compile`` (``torch.compile`` of the encoder's block stack; its compile time is
reported apart, or the error that stopped it). Each row gives its throughput, its speed-up over ``fp32``
and its loss after the timed steps (equal loss curves: the same to float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from common import add_common_options, markdown_table, parse_args, write_json
from streamssl import EncoderConfig
from streamssl.asr.ctc import CTCModel
from streamssl.train.config import PRESETS

FRONTENDS = [("conv", {}), ("fbank", {"subsampling": 4}), ("fbank", {"subsampling": 2}),
             ("none", {"input_dim": 80, "frame_ms": 20.0})]


def encoder_config(size: str, frontend: str, options: dict) -> EncoderConfig:
    preset = dict(PRESETS["finetune"]["cpu-small"]["encoder"])
    if size == "demo":
        values = dict(preset)
        if values.get("frontend", "conv") != frontend:
            values["frontend_options"] = {}
        values["frontend_options"] = {**values.get("frontend_options", {}), **options}
    else:
        values = dict(mixer=preset["mixer"], left_frames=preset["left_frames"], right_frames=preset["right_frames"],
                      frontend_options=dict(options))
    values.update(frontend=frontend, dropout=0.0)
    return EncoderConfig.from_dict(values)


def batch_input(config: EncoderConfig, model: CTCModel, batch: int, seconds: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if model.encoder.frontend.input_dim is not None:
        return torch.randn(batch, round(seconds * 1000 / config.frame_ms), model.encoder.frontend.input_dim,
                           generator=g)
    n = round(seconds * config.sample_rate)
    t = torch.arange(n) / config.sample_rate
    tone = torch.sin(2 * torch.pi * (150 + 100 * torch.rand(batch, 1, generator=g)) * t)
    return 0.1 * tone + 0.05 * torch.randn(batch, n, generator=g)


def measure(size: str, frontend: str, options: dict, steps: int, batch: int, seconds: float) -> dict:
    torch.manual_seed(0)
    config = encoder_config(size, frontend, options)
    model = CTCModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = batch_input(config, model, batch, seconds)
    with torch.no_grad():
        _, frame_lengths = model(x[:1])
    n_chars = max(1, int(frame_lengths[0]) // 3)
    targets = torch.randint(1, len(model.vocab), (batch * n_chars,), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        log_probs, lengths = model(x)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, torch.full((batch,), n_chars),
                          zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    extract_cpu_s = None
    if hasattr(model.encoder.frontend, "extract"):
        started = time.process_time()
        for _ in range(steps):
            model.encoder.frontend.extract(x)
        extract_cpu_s = (time.process_time() - started) / steps
    audio_s = batch * seconds * steps
    point = {"size": size, "frontend": frontend, "options": config.frontend_options,
             "d_model": config.d_model, "n_layers": config.n_layers, "mixer": config.mixer,
             "frame_ms": config.frame_ms, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
             "batch": batch, "seconds_per_utterance": seconds, "steps": steps,
             "step_wall_s": wall / steps, "step_cpu_s": cpu / steps, "audio_s_per_wall_s": audio_s / wall,
             "audio_s_per_cpu_s": audio_s / cpu, "extract_cpu_s_per_step": extract_cpu_s}
    print(point, flush=True)
    return point


VARIANTS = ("fp32", "bf16", "fused", "cached", "compile")


def measure_variant(variant: str, steps: int, batch: int, seconds: float) -> dict:
    """One of :data:`VARIANTS` of the demo-size fbank step; ``error`` says why where it cannot run."""
    torch.manual_seed(0)
    config = encoder_config("demo", "fbank", {"subsampling": 4})
    model = CTCModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=variant == "fused" or None)
    x = batch_input(config, model, batch, seconds)
    lengths = torch.full((batch,), x.shape[1])
    frontend, encoder = model.encoder.frontend, model.encoder
    mel, mel_lengths = frontend.extract(x, lengths)
    n_chars = max(1, int(frontend.output_lengths(lengths)[0]) // 3)
    targets = torch.randint(1, len(model.vocab), (batch * n_chars,), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()

    def step() -> float:
        with autocast:
            if variant == "cached":
                feats, frame_lengths = frontend.encode_features(mel, mel_lengths)
                y = encoder.encode_frames(encoder.project(feats), frame_lengths)
                log_probs = model.output(y).float().log_softmax(-1)
            else:
                log_probs, frame_lengths = model(x, lengths)
        loss = F.ctc_loss(log_probs.float().transpose(0, 1), targets, frame_lengths, torch.full((batch,), n_chars),
                          zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    point = {"variant": variant, "batch": batch, "seconds_per_utterance": seconds, "steps": steps}
    if variant == "compile":
        encoder.stack = torch.compile(encoder.stack)
    started = time.perf_counter()
    try:
        step()
    except Exception as error:  # report why the variant cannot run, and go on with the others
        # A compiler failure wraps the error that stopped it in a long message: report that line.
        causes = [line for line in str(error).splitlines() if "Error: " in line]
        point["error"] = f"{type(error).__name__}: {(causes or [str(error)])[-1].strip()[:160]}"
        print(point, flush=True)
        return point
    if variant == "compile":
        point["compile_wall_s"] = time.perf_counter() - started
    cpu = time.process_time()
    losses = [step() for _ in range(steps)]
    cpu = time.process_time() - cpu
    point.update(step_cpu_s=cpu / steps, audio_s_per_cpu_s=batch * seconds * steps / cpu, final_loss=losses[-1])
    print(point, flush=True)
    return point


def label(point: dict) -> str:
    if point["frontend"] == "fbank":
        return f"fbank {point['options'].get('subsampling', 4)}x"
    return point["frontend"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-steps", type=int, default=6)
    parser.add_argument("--base-steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="utterances per batch at demo size")
    parser.add_argument("--base-batch", type=int, default=2, help="utterances per batch at BASE size")
    parser.add_argument("--seconds", type=float, default=2.0, help="audio per utterance")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time stays meaningful on a shared machine)")
    parser.add_argument("--sizes", nargs="+", choices=("demo", "base"), default=["demo", "base"])
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS),
                        help="ways to a faster demo step to compare (none: skip)")
    parser.add_argument("--variant-steps", type=int, default=10)
    parser.add_argument("--variant-batch", type=int, default=5)
    parser.add_argument("--variant-seconds", type=float, default=4.0)
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(sizes=["demo"], demo_steps=1, batch=1, seconds=0.5,
                                         variants=["fp32", "cached"], variant_steps=1, variant_batch=1,
                                         variant_seconds=0.5))
    torch.set_num_threads(args.threads)

    runs = {"demo": (args.demo_steps, args.batch), "base": (args.base_steps, args.base_batch)}
    results = []
    for size in args.sizes:
        steps, batch = runs[size]
        for frontend, options in FRONTENDS:
            results.append(measure(size, frontend, options, steps, batch, args.seconds))
    variants = [measure_variant(v, args.variant_steps, args.variant_batch, args.variant_seconds)
                for v in args.variants]
    write_json(args.out / "train_throughput.json", {"frontends": results, "demo_variants": variants})

    header = ["size", "frontend", "frame", "params", "batch", "step (CPU)", "audio s / CPU s", "audio s / wall s",
              "knf share of step (CPU)"]
    rows = []
    for p in results:
        share = "" if p["extract_cpu_s_per_step"] is None else f"{p['extract_cpu_s_per_step'] / p['step_cpu_s']:.0%}"
        rows.append([f"{p['size']} ({p['n_layers']} x {p['d_model']})", label(p), f"{p['frame_ms']:.0f} ms",
                     f"{p['parameters_m']:.2f} M", f"{p['batch']} x {p['seconds_per_utterance']:g} s",
                     f"{p['step_cpu_s']:.2f} s", f"{p['audio_s_per_cpu_s']:.3g}",
                     f"{p['audio_s_per_wall_s']:.3g}", share])
    print()
    print(f"Training throughput, {args.threads} threads, {results[0]['mixer']} mixer:")
    print(markdown_table(header, rows))
    if variants:
        base = next((v for v in variants if v["variant"] == "fp32" and "error" not in v), None)
        rows = []
        for v in variants:
            if "error" in v:
                rows.append([v["variant"], "", "", "", "", v["error"]])
                continue
            speedup = f"{v['audio_s_per_cpu_s'] / base['audio_s_per_cpu_s']:.2f}x" if base else ""
            compiled = f"compiled in {v['compile_wall_s']:.0f} s" if "compile_wall_s" in v else ""
            rows.append([v["variant"], f"{v['step_cpu_s']:.3f} s", f"{v['audio_s_per_cpu_s']:.3g}", speedup,
                         f"{v['final_loss']:.4f}", compiled])
        print()
        print(f"Demo step variants (fbank 4x, {args.variant_batch} x {args.variant_seconds:g} s, "
              f"{args.variant_steps} steps, {args.threads} threads):")
        print(markdown_table(["variant", "step (CPU)", "audio s / CPU s", "vs fp32", "loss", "note"], rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.sizes), figsize=(4.5 * len(args.sizes), 3.5), squeeze=False)
    for ax, size in zip(axes[0], args.sizes):
        points = [p for p in results if p["size"] == size]
        names = [label(p) for p in points]
        ax.bar(names, [p["audio_s_per_cpu_s"] for p in points], color="tab:blue", label="per CPU second")
        ax.bar(names, [p["audio_s_per_wall_s"] for p in points], color="tab:orange", alpha=0.7,
               label="per wall second")
        ax.set_title(f"{size}: {points[0]['n_layers']} layers x d_model {points[0]['d_model']}")
        ax.set_ylabel("audio seconds trained per second")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(args.out / "train_throughput.png", dpi=100)
    print(f"plot: {args.out / 'train_throughput.png'}")


if __name__ == "__main__":
    main()
