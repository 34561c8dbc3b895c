"""The wav2vec 2.0 objective: masks, quantiser, loss pieces, learning on a tiny batch."""

import numpy as np
import pytest
import torch
from train_corpus import tone_audio

from streamssl.masking import span_mask, utterance_seed
from streamssl.objectives import GumbelQuantizer, Wav2Vec2Pretrainer
from streamssl.train.config import PretrainConfig, preset


def tiny_config(**objective_options) -> PretrainConfig:
    return PretrainConfig.from_dict({"objective_options": objective_options}, base=preset("pretrain", "tiny"))


def pretrainer(config: PretrainConfig) -> Wav2Vec2Pretrainer:
    return Wav2Vec2Pretrainer(config.encoder, config.parsed_objective_options())


def test_span_mask_stays_inside_utterances_and_covers_about_the_asked_fraction():
    lengths = torch.tensor([200, 120, 7])
    mask = span_mask(lengths, [1, 2, 3], prob=0.3, span=5, total=200)
    assert mask.shape == (3, 200)
    for b, length in enumerate(lengths.tolist()):
        assert not mask[b, length:].any()
        assert mask[b, :length].any()
    # about prob * T / span spans of 5 frames, minus overlaps: between half and all of 0.3 * T
    assert 0.15 * 200 <= int(mask[0].sum()) <= 0.3 * 200 + 5


def test_span_mask_depends_only_on_the_utterance_seed():
    a = span_mask(torch.tensor([50, 80]), [11, 22], 0.5, 4, 80)
    b = span_mask(torch.tensor([80]), [22], 0.5, 4, 80)
    assert torch.equal(a[1], b[0])
    assert utterance_seed(0, 3, "x") == utterance_seed(0, 3, "x") != utterance_seed(0, 4, "x")


def test_quantiser_is_hard_forward_and_soft_backward():
    torch.manual_seed(0)
    q = GumbelQuantizer(in_dim=8, groups=2, entries=5, dim=6)
    x = torch.randn(10, 8, requires_grad=True)
    out, probs = q(x, temperature=1.0, noise=torch.rand(10, 10))
    assert out.shape == (10, 6) and probs.shape == (10, 2, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10, 2))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # each codevector is the projection of one codebook entry per group
    entries, _ = q(x.detach(), 1.0, None)
    choice = q.logits(x.detach()).view(10, 2, 5).argmax(-1)
    expected = q.out(torch.cat([q.codebook[0, choice[:, 0]], q.codebook[1, choice[:, 1]]], dim=1))
    torch.testing.assert_close(entries, expected)


def test_loss_pieces_are_consistent():
    torch.manual_seed(0)
    cfg = tiny_config().parsed_objective_options()
    model = pretrainer(tiny_config())
    wave = torch.randn(2, 12000)
    out = model(wave, torch.tensor([12000, 9000]), [1, 2], step=0)
    expected = out["contrastive"] + cfg.diversity_weight * out["diversity"] + cfg.feature_penalty_weight * out["feature_penalty"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    torch.testing.assert_close(out["objective"], expected)
    assert 1 <= out["perplexity"] <= cfg.codebook_groups * cfg.codebook_entries
    assert 0 <= out["accuracy"] <= 1
    # chance level for 1 target among 1 + K candidates with random vectors is about log(K + 1)
    assert 0.5 < float(out["contrastive"]) < 3 * torch.log(torch.tensor(cfg.num_negatives + 1.0))


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    model = pretrainer(tiny_config()).eval()
    wave = torch.randn(1, 9000)
    alone = model(wave, torch.tensor([9000]), [5], step=0)
    padded = model(torch.cat([wave, torch.randn(1, 3000)], 1), torch.tensor([9000]), [5], step=0)
    torch.testing.assert_close(alone["loss"], padded["loss"], rtol=1e-5, atol=1e-5)


def tone_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Structured audio (a tone per character): masked frames are predictable from their context."""
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(tone_audio(t, rng)) for t in ("CAT DOG SUN TREE", "BLUE RED IT'S A GO", "TREE SUN CAT")]
    lengths = torch.tensor([w.shape[0] for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : w.shape[0]] = w
    return batch, lengths


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = pretrainer(tiny_config())
    wave, lengths = tone_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        out = model(wave, lengths, [7, 8, 9], step=0)  # same masks and noise every step
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append((float(out["objective"]), float(out["contrastive"])))
    assert history[-1][0] < 0.5 * history[0][0]
    late_contrastive = sum(c for _, c in history[-10:]) / 10
    assert late_contrastive < 0.9 * history[0][1]


def test_frontend_gradient_is_scaled():
    torch.manual_seed(0)
    grads = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        model = pretrainer(tiny_config(feature_grad_scale=scale, feature_penalty_weight=0.0))
        model(torch.randn(1, 8000, generator=torch.Generator().manual_seed(1)), None, [3], 0)["loss"].backward()
        grads[scale] = model.encoder.frontend.layers[0].conv.weight.grad.clone()
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    ({"objective_options": {"mask_prob": 1.5}}, "wav2vec2 option mask_prob must be in \\(0, 1\\), got 1.5"),
    ({"objective_options": {"final_dim": 15}}, "final_dim \\(15\\) must be divisible by codebook_groups \\(2\\)"),
    ({"objective_options": {"gumbel_end": 3.0}}, "gumbel_end <= gumbel_start, got 3.0, 2.0"),
    ({"objective_options": {"mask_lenght": 3}}, "objective 'wav2vec2' does not read option\\(s\\) \\['mask_lenght'\\]"),
    ({"mask_lenght": 3}, "unknown PretrainConfig keys"),
    ({"encoder": {"d_model": 30, "n_heads": 4}}, "divisible"),
    ({"steps": 0}, "steps"),
])
def test_bad_pretrain_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig.from_dict(bad, base=preset("pretrain", "tiny"))


def test_base_defaults_are_the_wav2vec2_base_values():
    config = PretrainConfig()
    cfg = config.parsed_objective_options()
    assert (cfg.mask_prob, cfg.mask_length, cfg.num_negatives, cfg.logit_temperature) == (0.65, 10, 100, 0.1)
    assert (cfg.codebook_groups, cfg.codebook_entries, cfg.final_dim) == (2, 320, 256)
    assert (cfg.gumbel_start, cfg.gumbel_end, cfg.gumbel_decay) == (2.0, 0.5, 0.999995)
    assert (cfg.diversity_weight, cfg.feature_penalty_weight, config.lr) == (0.1, 10.0, 5e-4)
    # Every option is spelt out in the saved configuration.
    assert config.to_dict()["objective_options"]["num_negatives"] == 100
    assert config.encoder.n_layers == 12 and config.encoder.d_model == 768
