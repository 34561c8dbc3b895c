"""Peak memory and time of one CTC training step: full fine-tuning vs selective WSM fine-tuning.

    python benchmarks/selective_memory.py [--device cuda] [--seconds 16] [--batch 1] [--threads 1]
    python benchmarks/selective_memory.py --encoder RUN_DIR [--replace last:2] [--batch 8]
    python benchmarks/selective_memory.py --smoke     # seconds: the selective mode of a tiny model

By default a wav2vec 2.0 BASE-sized ``Wav2Vec2ForCTC`` (12 layers, width 768, 7-layer conv feature encoder;
the ``transformers`` defaults; ``--hf-size tiny``: 4 layers of width 32), randomly initialised, 32 output
symbols, on a batch of random audio with random labels. With ``--encoder``, a streamssl CTC model (linear
head) whose encoder is loaded from that pretraining or fine-tuning run, and ``--replace`` layers in the
selective mode. Each mode runs in a fresh interpreter:

* ``full``: every parameter trains, the conv feature encoder included;
* ``full, frozen CNN``: the usual Hugging Face recipe (``freeze_feature_encoder()``);
* ``selective WSM last:4``: ``replace_attention(model, "last:4", "wsm")``, the method of the WSM paper
  (``--encoder``: the layers of ``--replace``);
* ``frozen encoder``: only the CTC head trains (a lower bound).

A step is forward, CTC loss, backward and an AdamW update. Three steps run; the first creates the
optimiser state, the time is the fastest of the last two. Memory: on CPU the peak resident set size
(``ru_maxrss``) minus the resident size after importing torch and transformers, before the model is
built, so it counts weights, gradients, optimiser state and activations; on CUDA
``torch.cuda.max_memory_allocated``. Prints a markdown table and writes
``selective_memory_<device>.json`` (``selective_memory_own_<device>.json`` with ``--encoder``) under ``--out``.
Without ``transformers`` (the ``hf`` extra) the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from common import add_common_options, markdown_table, parse_args, peak_rss_mb, reset_peak_rss, write_json

MODES = ("full", "full, frozen CNN", "selective WSM last:4", "frozen encoder")
BASELINES = ("full", "full, frozen CNN")
SAMPLE_RATE = 16000
HF_SIZES = {"base": {},
            "tiny": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16), conv_kernel=(10, 4), conv_stride=(5, 4), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4)}
"""``Wav2Vec2Config`` fields of each ``--hf-size`` beyond the ``transformers`` defaults (BASE)."""


def hf_model(mode: str, hf_size: str = "base"):
    """The Hugging Face model of ``hf_size`` set up for ``mode``, and its loss on ``(audio, labels)``."""
    import transformers

    from streamssl.selective import replace_attention

    config = transformers.Wav2Vec2Config(vocab_size=32, mask_time_prob=0.0, layerdrop=0.0, **HF_SIZES[hf_size])
    model = transformers.Wav2Vec2ForCTC(config)
    if mode == "full, frozen CNN":
        model.freeze_feature_encoder()
    elif mode == "selective WSM last:4":
        replace_attention(model, "last:4", mixer="wsm")
    elif mode == "frozen encoder":
        model.requires_grad_(False)
        model.freeze_feature_encoder()
        model.lm_head.requires_grad_(True)
    elif mode != "full":
        raise ValueError(f"unknown mode {mode!r}")
    return model, lambda audio, labels: model(audio, labels=labels).loss


def own_modes(replace: str) -> dict[str, tuple[str, str | None]]:
    """The modes measured with ``--encoder``: name -> (``FinetuneConfig.train_mode``, its replaced layers)."""
    return {"full": ("full", None), f"selective WSM {replace}": ("replace", replace),
            "frozen encoder": ("frozen", None)}


def own_model(mode: str, encoder_dir: str, replace: str):
    """A streamssl CTC model on the encoder of ``encoder_dir``, set up for ``mode``, and its loss."""
    import torch
    import torch.nn.functional as F

    from streamssl.asr.ctc import CTCModel
    from streamssl.selective.finetune import apply_train_mode
    from streamssl.train.sources import resolve_init

    init = resolve_init(encoder_dir)
    model = CTCModel(init.encoder_config)
    init.load_into(model)
    modes = own_modes(replace)
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; modes with --encoder: {sorted(modes)}")
    apply_train_mode(model, *modes[mode])

    def loss(audio, labels):
        log_probs, frames = model(audio)
        label_lengths = torch.full((audio.shape[0],), labels.shape[1])
        return F.ctc_loss(log_probs.transpose(0, 1), labels, frames, label_lengths, zero_infinity=True)
    return model, loss


def training_step_point(mode: str, seconds: float, batch: int, device: str, threads: int, steps: int = 3,
                        encoder: str | None = None, replace: str = "last:2", hf_size: str = "base") -> dict:
    """Measure ``mode`` in this process (meant to be a fresh one)."""
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (both models' baselines include it, so their peaks compare)

    from streamssl.selective import count_parameters

    base_mb = reset_peak_rss()
    torch.manual_seed(0)
    model, loss_of = own_model(mode, encoder, replace) if encoder else hf_model(mode, hf_size)
    trainable, total = count_parameters(model)
    model.to(device).train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    samples = int(seconds * SAMPLE_RATE)
    audio = torch.randn(batch, samples, device=device)
    symbols = len(model.vocab) if encoder else model.config.vocab_size   # index 0 is the CTC blank in both
    labels = torch.randint(1, symbols, (batch, int(seconds * 12)), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = loss_of(audio, labels)
        loss.backward()
        optimiser.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb() - base_mb
    return {"mode": mode, "peak_mb": peak, "time_s": min(times[1:]), "trainable_params": trainable,
            "total_params": total, "loss": loss.item()}


def measure(mode: str, seconds: float, batch: int, device: str, threads: int, encoder: str | None,
            replace: str, hf_size: str) -> dict:
    request = json.dumps(dict(mode=mode, seconds=seconds, batch=batch, device=device, threads=threads,
                              encoder=encoder, replace=replace, hf_size=hf_size))
    code = ("import json, sys; sys.path.insert(0, %r); from selective_memory import training_step_point; "
            "print(json.dumps(training_step_point(**json.loads(sys.argv[1]))))") % str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True)
    if done.returncode != 0:
        return {"mode": mode, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=16.0, help="audio per utterance")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", help=f"default: {', '.join(MODES)} (with --encoder: full, "
                                                   "selective, frozen encoder)")
    parser.add_argument("--encoder", help="a streamssl pretraining or fine-tuning run directory whose encoder "
                                          "is measured instead of the Hugging Face BASE model")
    parser.add_argument("--replace", default="last:2", help="layers the selective mode replaces (--encoder)")
    parser.add_argument("--hf-size", choices=sorted(HF_SIZES), default="base",
                        help="size of the Hugging Face model (tiny: 4 layers of width 32)")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(seconds=0.5, hf_size="tiny", modes=["selective WSM last:4"]))
    if importlib.util.find_spec("transformers") is None:
        print("skipped: transformers is not installed (pip install -e '.[hf]')")
        return
    modes = args.modes or list(own_modes(args.replace) if args.encoder else MODES)

    results = []
    for mode in modes:
        point = measure(mode, args.seconds, args.batch, args.device, args.threads, args.encoder, args.replace,
                        args.hf_size)
        results.append(point)
        print(point, flush=True)
    name = f"selective_memory_own_{args.device}.json" if args.encoder else f"selective_memory_{args.device}.json"
    write_json(args.out / name, {"seconds": args.seconds, "batch": args.batch, "device": args.device,
                                 "threads": args.threads, "encoder": args.encoder, "replace": args.replace,
                                 "results": results})

    reference = {r["mode"]: r for r in results if "peak_mb" in r}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["mode"], "error: " + r["error"], "", "", ""])
            continue
        baselines = [m for m in BASELINES if m in reference and r["mode"] not in BASELINES]
        versus = [f"{100 * (1 - r['peak_mb'] / reference[m]['peak_mb']):.0f} % below {m}" for m in baselines]
        rows.append([r["mode"], f"{r['trainable_params'] / 1e6:.1f} M / {r['total_params'] / 1e6:.1f} M",
                     f"{r['peak_mb']:.0f}", f"{r['time_s']:.2f}", "; ".join(versus)])
    print(markdown_table(["mode", "trainable / total params", "peak MB", "step s", "peak memory saved"], rows))


if __name__ == "__main__":
    main()
