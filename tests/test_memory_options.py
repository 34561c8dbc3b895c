"""The two memory options: gradient accumulation makes the update of one large batch, and activation
checkpointing keeps the gradients while keeping fewer activations for backward."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from train_corpus import make_corpus

from streamssl import MIXERS, Encoder, EncoderConfig
from streamssl.train.api import build_config
from streamssl.data import AudioDataset, collate, load_utterances
from streamssl.mixers import checkpoint_blocks
from streamssl.train.dist import World
from streamssl.train.tasks import FinetuneTask, PretrainTask
from streamssl.train.trainer import Trainer, seed_everything

SETTINGS = [("encoder.dropout", 0.0), ("lr", 3e-3), ("warmup_steps", 1), ("max_batch_seconds", 100.0)]
CHECKPOINTED = sorted(name for name in MIXERS if name not in ("amtrf", "emformer"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=6))


def trainer_for(kind: str, preset: str, corpus: str, run_dir, **fields) -> Trainer:
    sets = SETTINGS + list(fields.items())
    config = build_config(kind, preset, None, sets, train_data=corpus, steps=3)
    seed_everything(config.seed)
    task = PretrainTask(config) if kind == "pretrain" else FinetuneTask(config, log=lambda *a: None)
    return Trainer(task, run_dir, World(), load_utterances(corpus), progress=False, tensorboard=False,
                   log=lambda *a: None)


@pytest.mark.parametrize("kind, preset", [("finetune", "tiny"), ("pretrain", "tiny-bestrq")])
def test_accumulated_batches_make_the_update_of_their_union(kind, preset, corpus, tmp_path):
    data = AudioDataset(load_utterances(corpus))
    # Unequal parts: a plain mean of the parts' losses would weigh the two utterances of the second
    # part like the four of the first.
    parts = [collate([data[i] for i in range(4)]), collate([data[i] for i in range(4, 6)])]
    union = collate([data[i] for i in range(6)])
    large = trainer_for(kind, preset, corpus, tmp_path / "large")
    accumulated = trainer_for(kind, preset, corpus, tmp_path / "accumulated", grad_accum_steps=2)
    initial = {k: v.clone() for k, v in large.model.state_dict().items()}
    for name, value in accumulated.model.state_dict().items():
        assert torch.equal(value, initial[name]), f"{name}: different initialisation"
    large._train_step(union)
    accumulated._train_group(parts)
    # The gradients the optimiser stepped with (kept until the next step): Adam's first step is about
    # lr * sign(gradient), so parameters would magnify rounding in gradients near zero.
    grads = {name: p.grad for name, p in accumulated.model.named_parameters() if p.grad is not None}
    expected = {name: p.grad for name, p in large.model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected) and len(expected) > 0.8 * len(list(large.model.parameters()))
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        # Summation order differs between one batch and two, and by CPU kind: float32 rounding up to about
        # 2.4e-6 of a tensor's largest entry (measured on an AVX2 machine; elements near zero then fail a
        # purely relative bound). A wrong weighting of the parts moves whole gradients, not rounding.
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{name}: gradients differ")
    moved = [k for k, v in large.model.state_dict().items() if not torch.equal(v, initial[k])]
    assert len(moved) > 0.8 * len(initial)


def test_fit_takes_grad_accum_steps_batches_per_update(corpus, tmp_path):
    trainer = trainer_for("finetune", "tiny", corpus, tmp_path / "run", grad_accum_steps=3,
                          max_batch_seconds=1.5)
    per_epoch = len(trainer.batches.batches(0))
    assert per_epoch >= 4
    trainer.fit(until_step=1)
    assert (trainer.step, trainer.epoch, trainer.batch_in_epoch) == (1, 0, 3)


def saved_bytes(encoder: Encoder, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the forward keeps for backward, and the gradients of ``mean(y**2)``."""
    total = 0

    def keep(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(5)
    with saved_tensors_hooks(keep, lambda t: t):
        y, _ = encoder(x, torch.tensor([x.shape[1], x.shape[1] - 100]))
    y.pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    encoder.zero_grad(set_to_none=True)
    return total, grads


@pytest.mark.parametrize("mixer", CHECKPOINTED)
def test_checkpointing_keeps_the_gradients_and_less_memory(mixer):
    torch.manual_seed(0)
    # Dropout on: the recomputation must draw the same masks. Frame input, so that the stack's
    # activations are most of what is kept.
    config = EncoderConfig.tiny(mixer=mixer, n_layers=4, dropout=0.1, frontend="none",
                                frontend_options={"input_dim": 16})
    encoder = Encoder(config).train()
    x = torch.randn(2, 400, 16)
    plain_bytes, plain = saved_bytes(encoder, x)
    assert checkpoint_blocks(encoder) == 1
    checkpointed_bytes, grads = saved_bytes(encoder, x)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8, msg=f"{mixer}: {name}")
    assert checkpointed_bytes < 0.25 * plain_bytes, (checkpointed_bytes, plain_bytes)


@pytest.mark.parametrize("mixer", ["amtrf", "emformer"])
def test_segment_families_refuse_checkpointing(mixer):
    encoder = Encoder(EncoderConfig.tiny(mixer=mixer))
    with pytest.raises(ValueError, match="does not support it; use grad_accum_steps"):
        checkpoint_blocks(encoder)
    with pytest.raises(ValueError, match="needs a streamssl encoder"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("field, value, message", [
    ("grad_accum_steps", 0, "grad_accum_steps must be a positive integer, got 0"),
    ("activation_checkpointing", "yes", "activation_checkpointing must be true or false, got 'yes'"),
    ("num_buckets", 0, "num_buckets must be a positive integer, got 0"),
])
def test_bad_memory_options_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        build_config("finetune", "tiny", None, [(field, value)])
