"""The accelerator check: what must hold on a GPU before a long run, and what it costs, in one script.

    python benchmarks/device_check.py                    # one CUDA GPU, full sizes, under 8 minutes
    python benchmarks/device_check.py --device cpu       # the same checks at tiny sizes, seconds
    python benchmarks/device_check.py --smoke            # what CI runs: --device cpu, output to a temp folder

Five sections, each a table on stdout and a block of ``device_check_<device>.json`` under ``--out``:

1. ``contract``: the streaming contract of tests/test_contract.py, re-run on the device in float32 for
   every mixer (TF32 off): padding never changes a valid output, step/flush streaming equals the
   training form, the perturbation probe measures the declared look-ahead, every parameter gets a
   finite gradient.
2. ``bf16``: one wav2vec 2.0 pretraining step per mixer under bf16 autocast (what the trainer does on
   CUDA), BASE size on a GPU: the loss and every gradient finite, the weights moved.
3. ``ddp``: a process group of world size 1 (NCCL on CUDA, gloo on CPU): an all-reduce, and DDP's
   gradients equal to those of the unwrapped model.
4. ``attention``: forward+backward time and peak memory of one BASE-width layer (d_model 768, 12 heads,
   FFN 3072, left 64 and right 8 frames, batch 1) for sa, llsa, maa and PyTorch's
   ``scaled_dot_product_attention`` with a boolean band mask (the same band), at T = 4000 and 16000
   frames (80 s and 320 s at 20 ms). A point that does not fit says ``out_of_memory``.
5. ``pretrain``: ``--pretrain-seconds`` (120) of wav2vec 2.0 pretraining with the LibriSpeech recipe
   (recipes/librispeech/pretrain.yaml: BASE LLSA, 87.5 s of audio per step) on generated audio, through
   the trainer's own step: steps per second after ``--warmup-steps``, audio seconds per second, peak memory,
   and the FLOPs of one step (``torch.utils.flop_counter``: matrix products and convolutions) per second
   of audio, so achieved TFLOP/s too.

The exit status is 1 if any check of sections 1-3 fails. CUDA times are wall clock after a synchronise;
CPU times are process CPU time and peak memory is not measured there: on CPU the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from common import ROOT, add_common_options, markdown_table, parse_args, write_json

from streamssl import MIXERS, Encoder, EncoderConfig, measure_lookahead
from streamssl.train.api import build_config
from streamssl.data import Utterance
from streamssl.train.dist import World
from streamssl.train.tasks import PretrainTask
from streamssl.train.trainer import Trainer, seed_everything

RECIPE = ROOT / "recipes" / "librispeech" / "pretrain.yaml"
LEFT, RIGHT = 64, 8
# Float32 on a device: sums in another order than the CPU's, so equalities hold to this, not 1e-9.
FLOAT32_ATOL = 1e-4


# ------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_peak(run, device: torch.device, repeats: int) -> dict:
    """Best time of ``repeats`` calls of ``run`` after one warm-up, and the peak memory above what was
    allocated before (CUDA; resident set size on CPU, not isolated)."""
    run()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        synchronize(device)
        times.append(clock() - start)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    return {"time_s": min(times), "peak_mb": peak}


def max_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------ 1. contract
def tiny(mixer: str, device: torch.device, **overrides) -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig.tiny(mixer=mixer, **overrides)).to(device).eval()


def stream(encoder: Encoder, x: Tensor, sizes: list[int]) -> Tensor:
    state = encoder.init_state(x.shape[0])
    outputs, position, i = [], 0, 0
    while position < x.shape[1]:
        y, state = encoder.step(x[:, position:position + sizes[i % len(sizes)]], state)
        outputs.append(y)
        position, i = position + sizes[i % len(sizes)], i + 1
    y, _ = encoder.flush(state)
    return torch.cat(outputs + [y], dim=1)


def contract(mixer: str, device: torch.device) -> dict:
    """The contract checks of one mixer on ``device`` in float32; ``ok`` is whether all of them hold."""
    row: dict = {"mixer": mixer}
    generator = torch.Generator().manual_seed(1)
    encoder = tiny(mixer, device, left_frames=4, right_frames=1, n_layers=3)
    lengths = torch.tensor([9000, 4321, 6400])
    x = torch.randn(3, 9000, generator=generator)
    x[1, 4321:] = 100.0
    x, lengths = x.to(device), lengths.to(device)
    with torch.no_grad():
        y, y_lengths = encoder(x, lengths)
        row["padding_error"] = max(max_error(y[b, :y_lengths[b]], encoder(x[b:b + 1, :lengths[b]])[0][0])
                                   for b in range(3))
        if encoder.stack.stream_error() is None:
            frames = tiny(mixer, device, frontend="none", input_dim=12, left_frames=6, right_frames=2, n_layers=2)
            z = torch.randn(2, 157, 12, generator=generator).to(device)
            offline, _ = frames(z)
            row["streaming_error"] = max(max_error(stream(frames, z, sizes), offline)
                                         for sizes in ([1], [7, 1, 30], [157]))
    declared = encoder.latency().encoder_lookahead_frames
    measured = measure_lookahead(encoder).dependency_frames
    row["lookahead_declared"], row["lookahead_measured"] = declared, measured
    trained = tiny(mixer, device, left_frames=4, right_frames=1).train()
    out, out_lengths = trained(x[:2, :4000], torch.tensor([4000, 2500], device=device))
    mask = torch.arange(out.shape[1], device=device) < out_lengths[:, None]
    (out * mask[..., None]).pow(2).sum().backward()
    row["params_without_gradient"] = sum(p.grad is None or not bool(torch.isfinite(p.grad).all())
                                         for p in trained.parameters())
    row["ok"] = (row["padding_error"] < FLOAT32_ATOL and row.get("streaming_error", 0.0) < FLOAT32_ATOL
                 and declared == measured and row["params_without_gradient"] == 0)
    return row


# ------------------------------------------------------------------ 2. bf16
def pretrain_config(device: torch.device, mixer: str | None = None, train_data: str | None = None):
    """The recipe's configuration on CUDA (the ``tiny`` preset on CPU), with ``mixer`` if given."""
    sets = [] if mixer is None else [("encoder.mixer", mixer)]
    if mixer in ("amtrf", "emformer"):
        sets.append(("encoder.right_frames", 2))
    if device.type == "cuda":
        return build_config("pretrain", "base", str(RECIPE), sets, train_data=train_data)
    return build_config("pretrain", "tiny", None, sets, train_data=train_data)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_step(mixer: str, device: torch.device, batch: dict) -> dict:
    seed_everything(0)
    task = PretrainTask(pretrain_config(device, mixer))
    model = task.model.to(device).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with autocast(device):
        out = task.loss(model, batch, 0, World(device=device))
    out["loss"].backward()
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    optimizer.step()
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    loss = float(out["loss"].detach())
    return {"mixer": mixer, "loss": loss, "gradients_finite": finite, "parameters_moved": moved,
            "parameters": len(before), "ok": math.isfinite(loss) and finite and moved > 0.8 * len(before)}


# ------------------------------------------------------------------ 3. ddp
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_check(device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        reduced = torch.full((4,), 3.0, device=device)
        dist.all_reduce(reduced)
        plain = tiny("llsa", device).train()
        wrapped = DistributedDataParallel(copy.deepcopy(plain), device_ids=[device.index or 0]
                                          if device.type == "cuda" else None)
        x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(2)).to(device)
        for model in (plain, wrapped):
            model(x)[0].pow(2).mean().backward()
        error = max(max_error(a.grad, b.grad) for a, b in zip(plain.parameters(), wrapped.module.parameters()))
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "all_reduce": float(reduced[0]), "gradient_error": error,
            "ok": float(reduced[0]) == 3.0 and error < FLOAT32_ATOL}


# ------------------------------------------------------------------ 4. attention
class BandSDPALayer(nn.Module):
    """A pre-LayerNorm block like streamssl's, its attention PyTorch's ``scaled_dot_product_attention``
    with a boolean ``(T, T)`` band mask: the comparison point for SA/LLSA."""

    def __init__(self, d_model: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

    def forward(self, x: Tensor) -> Tensor:
        batch, frames, d_model = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, frames, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        t = torch.arange(frames, device=x.device)
        band = (t[None, :] >= t[:, None] - LEFT) & (t[None, :] <= t[:, None] + RIGHT)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        x = x + self.proj(o.transpose(1, 2).reshape(batch, frames, d_model))
        return x + self.ffn(self.norm2(x))


def attention_point(method: str, frames: int, d_model: int, heads: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    if method == "sdpa_band":
        layer = BandSDPALayer(d_model, heads, 4 * d_model).to(device)
        forward = layer
    else:
        config = EncoderConfig(frontend="none", frontend_options={"input_dim": d_model}, d_model=d_model,
                               n_heads=heads, ffn_dim=4 * d_model, dropout=0.0, n_layers=1, mixer=method,
                               left_frames=LEFT, right_frames=RIGHT)
        layer = Encoder(config).to(device)

        def forward(x: Tensor) -> Tensor:
            return layer(x)[0]

    layer.train()
    x = torch.randn(1, frames, d_model, device=device)

    def run() -> None:
        forward(x).pow(2).mean().backward()
        layer.zero_grad(set_to_none=True)

    try:
        point = timed_peak(run, device, repeats)
    except torch.OutOfMemoryError:
        layer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"method": method, "frames": frames, "out_of_memory": True}
    return {"method": method, "frames": frames, "out_of_memory": False, **point}


# ------------------------------------------------------------------ 5. pretraining throughput
def generated_corpus(folder: Path, count: int, seconds: tuple[float, float], seed: int = 0) -> list[Utterance]:
    """``count`` WAV files of noise with durations drawn from ``seconds``: throughput does not depend on
    what is said, and nothing is downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    utterances = []
    for i in range(count):
        samples = int(rng.uniform(*seconds) * 16000)
        path = folder / f"gen{i:04d}.wav"
        soundfile.write(path, (0.1 * rng.standard_normal(samples)).astype(np.float32), 16000, subtype="PCM_16")
        utterances.append(Utterance(f"g-{i:04d}", str(path), samples / 16000, "A", "g"))
    return utterances


def pretrain_throughput(device: torch.device, utterances: list[Utterance], seconds: float, warmup_steps: int,
                        run_dir: Path) -> dict:
    config = pretrain_config(device)
    seed_everything(config.seed)
    task = PretrainTask(config)
    trainer = Trainer(task, run_dir, World(device=device), utterances, progress=False, tensorboard=False,
                      log=lambda *a, **k: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, timed, audio_s, started, epoch, flops, first_audio_s = 0, 0, 0.0, None, 0, 0, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for batch in trainer.batches.iterate(epoch, 0):
            # The first step (never timed) also counts the FLOPs of matrix products and convolutions.
            with FlopCounterMode(display=False) if steps == 0 else contextlib.nullcontext() as counter:
                trainer._train_step(batch)
            if steps == 0:
                flops, first_audio_s = counter.get_total_flops(), float(batch["lengths"].sum()) / task.sample_rate
            trainer.step += 1
            steps += 1
            if steps == warmup_steps:
                synchronize(device)
                started = time.perf_counter()
            elif steps > warmup_steps:
                timed += 1
                audio_s += float(batch["lengths"].sum()) / task.sample_rate
            if time.perf_counter() >= deadline:
                break
        epoch += 1
    synchronize(device)
    if not timed:
        raise SystemExit(f"device_check: pretraining made {steps} step(s) in {seconds:g} s, none timed after "
                         f"--warmup-steps {warmup_steps}; give it more --pretrain-seconds")
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"mixer": task.encoder_config.mixer, "parameters_m": sum(p.numel() for p in task.model.parameters()) / 1e6,
            "max_batch_seconds": config.max_batch_seconds, "steps": steps, "timed_steps": timed,
            "steps_per_s": timed / elapsed, "audio_s_per_s": audio_s / elapsed, "peak_mb": peak,
            "gflop_per_audio_s": flops / first_audio_s / 1e9,
            "achieved_tflop_per_s": flops / first_audio_s * audio_s / elapsed / 1e12}


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (full sizes) or cpu (tiny sizes)")
    parser.add_argument("--frames", type=int, nargs="+", help="attention lengths (default 4000 16000; CPU 64)")
    parser.add_argument("--pretrain-seconds", type=float, help="pretraining time (default 120; CPU 3)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="pretraining steps before timing starts")
    parser.add_argument("--repeats", type=int, default=3, help="timed attention repeats (best of)")
    add_common_options(parser)
    args = parse_args(parser, smoke=dict(device="cpu", warmup_steps=1, repeats=1))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check: no CUDA device here; run it on a GPU, or with --device cpu (tiny sizes)")
    gpu = device.type == "cuda"
    frames = args.frames or ([4000, 16000] if gpu else [64])
    d_model, heads = (768, 12) if gpu else (64, 4)
    pretrain_seconds = args.pretrain_seconds or (120.0 if gpu else 3.0)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if not gpu:
        torch.set_num_threads(1)
    started = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
                    "cuda": torch.version.cuda}

    mixers = sorted(MIXERS)
    result["contract"] = [contract(m, device) for m in mixers]
    with tempfile.TemporaryDirectory(prefix="streamssl-device-check-") as tmp:
        short = generated_corpus(Path(tmp) / "short", 2, (4.0, 4.0) if gpu else (1.0, 1.0))
        from streamssl.data import AudioDataset, collate

        batch = collate([AudioDataset(short)[i] for i in range(2)])
        result["bf16"] = [bf16_step(m, device, batch) for m in mixers]
        result["ddp"] = ddp_check(device)
        result["attention"] = [attention_point(m, t, d_model, heads, device, args.repeats)
                               for t in frames for m in ("sa", "llsa", "maa", "sdpa_band")]
        corpus = generated_corpus(Path(tmp) / "corpus", 256 if gpu else 8, (10.0, 16.0) if gpu else (1.0, 2.0))
        result["pretrain"] = pretrain_throughput(device, corpus, pretrain_seconds, args.warmup_steps, Path(tmp) / "run")
    result["ok"] = all(r["ok"] for r in result["contract"] + result["bf16"]) and result["ddp"]["ok"]
    result["elapsed_s"] = time.perf_counter() - started
    write_json(args.out / f"device_check_{device.type}.json", result)

    print(f"device check on {result['device']} (torch {result['torch']}), {result['elapsed_s']:.0f} s: "
          f"{'all checks hold' if result['ok'] else 'SOME CHECKS FAIL'}")
    print("\n1. streaming contract, float32")
    print(markdown_table(["mixer", "padding err", "streaming err", "look-ahead declared / measured", "no grad", "ok"],
                         [[r["mixer"], f"{r['padding_error']:.1e}",
                           f"{r['streaming_error']:.1e}" if "streaming_error" in r else "cannot stream",
                           f"{r['lookahead_declared']} / {r['lookahead_measured']}", r["params_without_gradient"],
                           r["ok"]] for r in result["contract"]]))
    print("\n2. one bf16 autocast pretraining step")
    print(markdown_table(["mixer", "loss", "gradients finite", "parameters moved", "ok"],
                         [[r["mixer"], f"{r['loss']:.3f}", r["gradients_finite"], f"{r['parameters_moved']} of "
                           f"{r['parameters']}", r["ok"]] for r in result["bf16"]]))
    d = result["ddp"]
    print(f"\n3. DDP, world size 1, {d['backend']}: all_reduce {d['all_reduce']:g}, gradient error "
          f"{d['gradient_error']:.1e}, ok {d['ok']}")
    print(f"\n4. one layer forward+backward, d_model {d_model}, {heads} heads, band [-{LEFT}, +{RIGHT}]")
    print(markdown_table(["T (frames)", "method", "time (s)", "peak (MB)"],
                         [[r["frames"], r["method"], "out of memory" if r["out_of_memory"] else f"{r['time_s']:.3f}",
                           "" if r["out_of_memory"] or r["peak_mb"] is None else f"{r['peak_mb']:.0f}"]
                          for r in result["attention"]]))
    p = result["pretrain"]
    print(f"\n5. wav2vec 2.0 pretraining ({p['mixer']}, {p['parameters_m']:.1f} M parameters, "
          f"{p['max_batch_seconds']:g} s of audio per step): {p['steps_per_s']:.3f} steps/s over {p['timed_steps']} "
          f"steps, {p['audio_s_per_s']:.1f} s of audio per s, {p['gflop_per_audio_s']:.1f} GFLOP per s of audio "
          f"(products and convolutions, forward+backward): {p['achieved_tflop_per_s']:.2f} TFLOP/s"
          + ("" if p["peak_mb"] is None else f", peak {p['peak_mb']:.0f} MB"))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
