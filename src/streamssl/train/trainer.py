"""The training loop shared by pretraining and fine-tuning.

A run lives in one folder::

    config.yaml      the task configuration (PretrainConfig / FinetuneConfig), encoder included
    encoder.yaml     the EncoderConfig alone; after --replace also ``layer_mixers``, each layer's real mixer
    checkpoint.pt    the latest checkpoint (see streamssl.train.checkpoint); resumes the run exactly
    train.csv        one row per ``log_every`` steps: step, epoch, lr, averaged metrics, elapsed time
    eval.csv         one row per dev evaluation
    tb/              the same scalars for TensorBoard
    summary.json     written when the run reaches ``steps``: the encoder's mixers (``mixer``, e.g.
                     ``sa+wsm(last:1)``), the torch threads and the latest metrics; a pretraining run's has
                     a ``health`` block

Pretraining runs also log their health (streamssl.train.health): accuracy against its chance level,
code perplexity and masked fraction, with a ``WARNING`` line when, after the learning-rate warm-up,
accuracy stays within 1.5x chance or the codes collapse.

Starting a run in a folder that holds a checkpoint of the same configuration resumes it (an already
finished run returns at once); a different configuration is an error. Only rank 0 writes.

Memory options: with ``grad_accum_steps`` k, an update takes k batches, each backpropagated as it comes
(gradients summed, DDP synchronising only at the last), weighted by the count its loss is normalised
by (characters, masked frames) and divided by the total, so the update is that of one batch of all k;
with ``activation_checkpointing`` every block's activations are recomputed in backward
(:func:`streamssl.mixers.checkpoint_blocks`).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from streamssl.mixers import checkpoint_blocks
from streamssl.train.checkpoint import (encoder_record, naming, read_payload, rng_state, save_checkpoint,
                                        set_rng_state, vocab_entries)
from streamssl.train.data import CutSplit, training_batches
from streamssl.train.dist import World
from streamssl.train.health import health_summary, health_warnings

# Configuration fields that change bookkeeping, not the numbers a run computes: they may differ on resume.
BOOKKEEPING = {"log_every", "save_every", "eval_every", "num_workers", "train_data", "dev_data", "skip_bad",
               "activation_checkpointing"}
# The key of a task's loss output that holds the count its loss was divided by (summed over ranks).
LOSS_COUNT = "loss_count"


def groups(batches: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive runs of ``size`` batches (the last one of an epoch may be shorter)."""
    while group := list(itertools.islice(batches, size)):
        yield group


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed every global generator (weight initialisation, dropout). Ranks get different dropout."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)


@contextlib.contextmanager
def reproducible(device: torch.device) -> Iterator[None]:
    """Deterministic kernels while a CPU run trains, so that two runs with the same configuration and the
    same torch thread count are bit-identical (weights, losses, logs but for the times).

    Some CPU kernels otherwise add into one tensor from several threads in whatever order the threads
    finish: the backward of indexing (``index_put_`` with ``accumulate=True``), which the wav2vec 2.0 loss
    uses to gather its targets and distractors, made two 2-thread runs of the demo's pretraining drift
    apart in the last bits from the first step. The thread count itself stays the caller's choice: a
    sum split over 2 threads rounds differently from one over 1. CUDA runs are left as they are
    (deterministic CUDA kernels need ``CUBLAS_WORKSPACE_CONFIG`` before CUDA starts, and CTC's backward
    has none).
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def lr_factor(step: int, warmup: int, hold: int, total: int, final_ratio: float) -> float:
    """Linear warm-up to 1, hold, then linear decay to ``final_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold:
        return 1.0
    decay = max(1, total - warmup - hold)
    return 1.0 - (1.0 - final_ratio) * min(1.0, (step - warmup - hold) / decay)


class _Logger:
    """CSV files and TensorBoard scalars of rank 0; rows past ``resume_step`` (written after the
    checkpoint a run resumes from) are dropped so the logs match the resumed run."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        self.run_dir = run_dir
        for name in ("train.csv", "eval.csv"):
            path = run_dir / name
            if path.exists():
                rows = list(csv.DictReader(path.open()))
                kept = [r for r in rows if int(r["step"]) <= resume_step]
                if len(kept) != len(rows):
                    self._rewrite(path, kept)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        with path.open("w", newline="") as f:
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)

    def write(self, name: str, row: dict[str, Any]) -> None:
        path = self.run_dir / name
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            prefix = name.split(".")[0]
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{key}", value, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Runs ``task`` (a :class:`~streamssl.train.tasks.PretrainTask` or ``FinetuneTask``) in ``run_dir``.

    Build the task after :func:`seed_everything` so weight initialisation is seeded.
    """

    def __init__(self, task, run_dir: str | Path, world: World, train_utterances: list | CutSplit,
                 dev_utterances: list | None = None, progress: bool = True, tensorboard: bool = True,
                 log=print):
        self.task, self.config, self.world = task, task.config, world
        self.run_dir = Path(run_dir)
        self.dev = dev_utterances
        self.progress, self.log = progress and world.is_main, log if world.is_main else (lambda *a, **k: None)
        self.model: nn.Module = task.model.to(world.device)
        cfg = self.config
        # The fused kernel: one pass over every parameter instead of a dozen small ops each, 3-11 % of a
        # demo-size CPU step (benchmarks/train_throughput.py, "fused").
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.hold_steps, cfg.steps, cfg.final_lr_ratio))
        self.step = self.epoch = self.batch_in_epoch = 0
        self.metrics: dict[str, float] = {}
        self.warned: dict[str, str] = {}  # health warning kind -> its first message
        lazy = isinstance(train_utterances, CutSplit)
        if not self.checkpoint_path.exists():
            task.prepare(train_utterances.sample if lazy else train_utterances, self.log)
        self._resume()
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
            (self.run_dir / "encoder.yaml").write_text(
                yaml.safe_dump(encoder_record(cfg, task.encoder_config), sort_keys=False))
        dataset = cfg.augment_options().dataset([] if lazy else train_utterances, task.sample_rate, cfg.seed)
        self.batches = training_batches(train_utterances, cfg, world, dataset)
        if cfg.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.module = self.model
        if world.distributed:
            ids = [world.device.index] if world.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.model, device_ids=ids,
                                                  find_unused_parameters=task.find_unused_parameters)

    # -------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        payload = read_payload(self.checkpoint_path)
        if payload["kind"] != self.task.kind:
            raise ValueError(f"{self.run_dir} holds a {payload['kind']} run; use another --out for {self.task.kind}")
        # Through from_dict, so that fields added since the run was saved compare at their defaults.
        with naming(self.checkpoint_path):
            saved = type(self.config).from_dict(payload["task_config"]).to_dict()
        wanted = self.config.to_dict()
        differ = sorted(k for k in set(saved) | set(wanted) if k not in BOOKKEEPING and saved.get(k) != wanted.get(k))
        if differ:
            raise ValueError(f"{self.run_dir} holds a run with a different configuration (fields {differ}); "
                             "use another --out, or delete the folder to start over")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        progress = payload["progress"]
        self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        self.metrics = payload.get("metrics", {})
        self.warned = payload.get("warnings", {})
        states = payload["rng"]
        set_rng_state(states[self.world.rank] if len(states) == self.world.size else states[0])
        self.log(f"resuming {self.run_dir} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def save(self) -> None:
        states = [None] * self.world.size
        if self.world.distributed:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if self.world.is_main:
            save_checkpoint(self.checkpoint_path, {
                "kind": self.task.kind,
                "encoder_config": self.task.encoder_config.to_dict(),
                "task_config": self.config.to_dict(),
                **vocab_entries(self.task.vocab),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "progress": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
                "rng": states,
                "metrics": self.metrics,
                "warnings": self.warned,
            })
        self.world.barrier()

    # -------------------------------------------------------------- training
    def _autocast(self):
        if self.world.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, batch: dict) -> dict[str, float]:
        """One update from one batch."""
        return self._train_group([batch])

    def _train_group(self, batches: list[dict]) -> dict[str, float]:
        """One update from ``batches`` (``grad_accum_steps`` of them, fewer at the end of an epoch); returns
        the training metrics averaged over them."""
        encoder_trains = self.task.before_step(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        accumulate = len(batches) > 1
        total_count = 0.0
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            # DDP reduces gradients in backward; before the last batch they only need summing here.
            sync = self.module.no_sync() if self.world.distributed and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self.task.loss(self.module, batch, self.step, self.world)
                count = out.pop(LOSS_COUNT)
                # Undo the batch's own normalisation; the sum is divided by every batch's count below.
                (out["loss"] * count if accumulate else out["loss"]).backward()
            total_count += float(count)
            # Per-batch tensors (code histograms) are for dev aggregation, not for the training log.
            for k, v in out.items():
                if k != "loss" and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v)
        if accumulate:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.div_(total_count)
        if not encoder_trains:
            for p in self.model.encoder.parameters():
                p.grad = None
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {k: v / len(batches) for k, v in sums.items()}

    def health(self) -> dict[str, Any] | None:
        """Pretraining health of the latest metrics (see :mod:`streamssl.train.health`); ``None`` for a
        task without codes (fine-tuning)."""
        entries = getattr(self.task, "codebook_entries", None)
        return None if entries is None else health_summary(self.metrics, entries)

    def check_health(self) -> list[str]:
        """Log each kind of health warning the first time it holds; returns the warnings that hold now."""
        health = self.health()
        if health is None:
            return []
        found = health_warnings(health, self.step, self.config.warmup_steps)
        for kind, message in found:
            if kind not in self.warned:
                self.warned[kind] = message
                self.log(f"WARNING: {message}")
        return [message for _, message in found]

    def evaluate(self) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.dev and self.world.is_main:
            results = self.task.evaluate(self.dev, self.world)
            self.logger.write("eval.csv", {"step": self.step, **{k: round(v, 6) for k, v in results.items()}})
            self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        self.world.barrier()
        return results

    def fit(self, until_step: int | None = None) -> dict[str, float]:
        """Train to ``config.steps`` (or stop after ``until_step``, checkpointed, resumable).

        Returns the latest metrics (training averages and dev scores).
        """
        cfg = self.config
        stop = cfg.steps if until_step is None else min(until_step, cfg.steps)
        if self.step >= stop:
            self.log(f"{self.run_dir}: already at step {self.step}; nothing to do")
            return self.metrics
        self.logger = _Logger(self.run_dir, self.step, tensorboard=True) if self.world.is_main else None
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.task.kind, disable=not self.progress,
                   dynamic_ncols=True)
        sums: dict[str, float] = {}
        count, started = 0, time.perf_counter()
        while self.step < stop:
            batches = groups(self.batches.iterate(self.epoch, self.batch_in_epoch), cfg.grad_accum_steps)
            for group in batches:
                values = self._train_group(group)
                self.step += 1
                self.batch_in_epoch += len(group)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in list(values.items())[:2]}, refresh=False)
                if self.step % cfg.log_every == 0 or self.step == stop:
                    averages = {k: v / count for k, v in sums.items()}
                    self.metrics.update(averages)
                    if self.world.is_main:
                        self.logger.write("train.csv", {"step": self.step, "epoch": self.epoch,
                                                        "lr": self.scheduler.get_last_lr()[0],
                                                        **{k: round(v, 6) for k, v in averages.items()},
                                                        "elapsed_s": round(time.perf_counter() - started, 2)})
                    sums, count = {}, 0
                    self.check_health()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.metrics.update(self.evaluate())
                    self.check_health()
                # The finished run is saved after its final evaluation, below.
                if self.step % cfg.save_every == 0 or self.step == stop < cfg.steps:
                    self.save()
                if self.step >= stop:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.step == 0:
                    raise ValueError("the training data gives no batch; lower max_batch_seconds or add data")
        bar.close()
        if self.step >= cfg.steps:
            self.metrics.update(self.evaluate())
            holding = self.check_health()
            self.save()
            summary: dict[str, Any] = {"kind": self.task.kind, "mixer": self.task.mixer_label, "step": self.step,
                                       "epoch": self.epoch, "threads": torch.get_num_threads(), **self.metrics}
            health = self.health()
            if health is not None:
                summary["health"] = {**health, "warnings": holding}
                self.log(f"pretraining health ({health['source']}): accuracy {health['accuracy']:.4f} against chance "
                         f"{health['chance']:.4f} ({health['accuracy_over_chance']:.2f}x), code perplexity "
                         f"{health['code_perplexity']:.1f} of {health['codebook_entries']} entries, masked fraction "
                         f"{health['masked_fraction']:.3f}")
            if self.world.is_main:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.logger is not None:
            self.logger.close()
        return self.metrics
