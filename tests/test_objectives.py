"""Self-supervised objectives: BEST-RQ's frozen targets, masking and loss; every objective on every mixer."""

import pytest
import torch
import torch.nn.functional as F

from streamssl.config import EncoderConfig
from streamssl.objectives import BestRQOptions, BestRQPretrainer, RandomProjectionQuantizer


def frames_encoder(**overrides) -> EncoderConfig:
    return EncoderConfig.tiny(frontend="none", input_dim=12, mixer="llsa", **overrides)


def bestrq(**options) -> BestRQPretrainer:
    torch.manual_seed(0)
    return BestRQPretrainer(frames_encoder(), BestRQOptions(**{"codebook_entries": 32, "mask_length": 2, **options}))


def test_quantizer_labels_are_the_nearest_normalised_codeword_and_depend_only_on_the_seed():
    q = RandomProjectionQuantizer(in_dim=24, codebooks=2, entries=50, dim=16, seed=3)
    x = torch.randn(40, 24)
    labels = q(x)
    assert labels.shape == (40, 2)
    for c in range(2):
        z = F.normalize(x @ q.projection[c], dim=-1)
        nearest = torch.cdist(z, q.codebook[c]).argmin(-1)
        assert torch.equal(labels[:, c], nearest)
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(2, 50))
    bound = (6 / (24 + 16)) ** 0.5
    assert q.projection.abs().max() <= bound and q.projection.abs().max() > 0.9 * bound
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(RandomProjectionQuantizer(24, 2, 50, 16, seed=3)(x), labels)
    assert not torch.equal(RandomProjectionQuantizer(24, 2, 50, 16, seed=4)(x), labels)


def test_labels_stack_input_frames_to_the_encoder_frame_rate():
    model = bestrq()
    model.stack = 2  # as a 2x-subsampling frontend would have it
    model.quantizer = RandomProjectionQuantizer(24, 1, 32, 16, seed=0)
    x = torch.randn(1, 7, 12)
    labels = model.labels(x)
    assert labels.shape == (1, 4, 1)
    stacked = torch.cat([x, torch.zeros(1, 1, 12)], dim=1).reshape(4, 24)
    assert torch.equal(labels[0], model.quantizer(stacked))


def test_frozen_parts_are_buffers_in_the_state_dict_and_never_change():
    model = bestrq()
    state = model.state_dict()
    assert {"quantizer.projection", "quantizer.codebook"} <= set(state)
    assert not any(name.startswith("quantizer.") for name, _ in model.named_parameters())
    before = {k: v.clone() for k, v in state.items() if k.startswith("quantizer.")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, lengths = torch.randn(2, 40, 12), torch.tensor([40, 25])
    out = model(x, lengths, [1, 2], step=0)
    out["loss"].backward()
    optimizer.step()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.encoder.feature_proj.weight.grad.abs().sum() > 0


def test_masked_inputs_are_noise_and_the_loss_is_cross_entropy_at_masked_frames_only(monkeypatch):
    model = bestrq(noise_std=0.1, mask_prob=0.4)
    x, lengths = torch.randn(2, 300, 12), torch.tensor([300, 200])
    seen = {}
    features = model.encoder.features

    def spy(inputs, lengths, augment=None):
        def wrapped(feats, input_lengths):
            seen["clean"], seen["masked"] = feats, augment(feats, input_lengths)
            return seen["masked"]

        return features(inputs, lengths, augment=wrapped)

    monkeypatch.setattr(model.encoder, "features", spy)
    out = model(x, lengths, [5, 6], step=0)
    changed = (seen["masked"] != seen["clean"]).any(-1)
    assert not changed[1, 200:].any()  # padding is never masked
    fraction = changed[:, :200].float().mean()
    assert 0.2 < fraction < 0.45
    torch.testing.assert_close(out["masked_fraction"], changed.sum() / lengths.sum().float())
    noise = seen["masked"][changed]
    assert abs(float(noise.std()) - 0.1) < 0.01 and abs(float(noise.mean())) < 0.01
    assert torch.equal(seen["masked"][~changed], x[~changed])

    # The same loss by hand: the head's output at masked frames against the clean inputs' labels.
    labels = model.labels(x)[..., 0]
    with torch.no_grad():
        hidden = model.encoder.encode_frames(model.encoder.project(seen["masked"]), lengths)
        logits = model.head(hidden)
    expected = F.cross_entropy(logits[changed], labels[changed])
    torch.testing.assert_close(out["cross_entropy"], expected)
    accuracy = (logits[changed].argmax(-1) == labels[changed]).float().mean()
    torch.testing.assert_close(out["accuracy"], accuracy)
    counts = torch.bincount(labels[changed], minlength=32).float()
    torch.testing.assert_close(out["code_counts"][0], counts)
    torch.testing.assert_close(out["chance"], counts.max() / counts.sum())


def test_padding_does_not_change_the_loss():
    model = bestrq().eval()
    x = torch.randn(1, 60, 12)
    alone = model(x, torch.tensor([60]), [9], step=0)
    padded = model(torch.cat([x, torch.randn(1, 20, 12)], dim=1), torch.tensor([60]), [9], step=0)
    torch.testing.assert_close(alone["loss"], padded["loss"], rtol=1e-5, atol=1e-5)


def test_bestrq_learns_a_predictable_sequence_well_above_chance():
    # Frames that repeat a 6-frame pattern: a masked frame is predictable from its neighbours.
    torch.manual_seed(0)
    pattern = torch.randn(6, 12)
    x = pattern.repeat(4, 10, 1).reshape(4, 60, 12) + 0.01 * torch.randn(4, 60, 12)
    lengths = torch.full((4,), 60)
    model = bestrq(codebook_entries=16, mask_length=2, mask_prob=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        out = model(x, lengths, [step * 4 + i for i in range(4)], step)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    final = model(x, lengths, [1000, 1001, 1002, 1003], 0)
    assert float(final["accuracy"]) > 0.9
    assert float(final["accuracy"]) > 3 * float(final["chance"])


def test_bestrq_needs_a_frontend_with_input_features():
    with pytest.raises(ValueError, match="bestrq objective needs a frontend with input features"):
        BestRQPretrainer(EncoderConfig.tiny(), BestRQOptions(codebook_entries=8))


@pytest.mark.parametrize("bad, message", [
    ({"codebook_entries": 1}, "codebook_entries"),
    ({"codebook_dim": 0}, "codebook_dim"),
    ({"mask_prob": 1.0}, "mask_prob"),
    ({"noise_std": -0.1}, "noise_std"),
    ({"mask_lenght": 3}, "objective 'bestrq' does not read option\\(s\\) \\['mask_lenght'\\]"),
])
def test_bad_bestrq_options_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        BestRQPretrainer.parse_options(bad)


# ---------------------------------------------------------------- training: every objective x every mixer

TRAIN_SETTINGS = [("max_batch_seconds", 2.5), ("save_every", 100), ("log_every", 1), ("warmup_steps", 1)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from train_corpus import make_corpus

    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=6))


def pretrain_config(objective: str, mixer: str, corpus: str, steps: int, sets=()):
    from streamssl.train.api import build_config

    return build_config("pretrain", {"wav2vec2": "tiny-fbank", "bestrq": "tiny-bestrq"}[objective], None,
                        [*TRAIN_SETTINGS, ("encoder.mixer", mixer), *sets], train_data=corpus, steps=steps)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["wav2vec2", "bestrq"])
@pytest.mark.parametrize("mixer", sorted(__import__("streamssl.mixers", fromlist=["MIXERS"]).MIXERS))
def test_every_objective_pretrains_every_mixer_and_resumes(objective, mixer, corpus, tmp_path):
    from streamssl.train.api import run_training
    from streamssl.data import AudioDataset, collate, load_utterances
    from streamssl.masking import utterance_seed
    from streamssl.train.checkpoint import load_checkpoint

    config = pretrain_config(objective, mixer, corpus, steps=3)
    run_training("pretrain", config, str(tmp_path / "run"), stop_after=2, progress=False)
    stopped = load_checkpoint(tmp_path / "run", kind="pretrain")
    assert stopped.step == 2
    metrics = run_training("pretrain", config, str(tmp_path / "run"), progress=False)
    final = load_checkpoint(tmp_path / "run", kind="pretrain")
    assert final.step == 3 and final.config.objective == objective
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if isinstance(v, float))

    model = final.model.train()
    utterances = load_utterances(corpus)[:2]
    batch = collate([AudioDataset(utterances)[i] for i in range(2)])
    out = model(batch["audio"], batch["lengths"], [utterance_seed(0, 9, u.id) for u in utterances], 9)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    reached = [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.encoder.stack.parameters()]
    assert sum(reached) > 0.5 * len(reached)
    assert float(model.encoder.feature_proj.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------- pretraining health

def test_health_rules_warn_near_chance_and_on_collapse_only_after_warmup():
    from streamssl.train.health import collapse_threshold, health_summary, health_warnings

    metrics = {"accuracy": 0.07, "chance": 0.05, "code_perplexity": 40.0, "masked_fraction": 0.4}
    health = health_summary(metrics, entries=256)
    assert health["source"] == "train" and health["accuracy_over_chance"] == pytest.approx(1.4)
    assert [k for k, _ in health_warnings(health, step=100, warmup_steps=10)] == ["chance"]
    assert health_warnings(health, step=19, warmup_steps=10) == []  # a warm-up's worth of full-rate steps first
    dev = health_summary({**metrics, "dev_accuracy": 0.2, "dev_chance": 0.05, "dev_code_perplexity": 1.5,
                          "dev_masked_fraction": 0.4}, entries=256)
    assert dev["source"] == "dev"
    kinds = health_warnings(dev, step=100, warmup_steps=10)
    assert [k for k, _ in kinds] == ["collapse"] and "1.50 of 256" in kinds[0][1]
    assert collapse_threshold(64) == 2.0 and collapse_threshold(8192) == pytest.approx(40.96)
    assert health_summary({"ctc_per_char": 1.0}, entries=8) is None


def test_a_run_near_chance_logs_the_warning_and_its_summary_keeps_it(corpus, tmp_path, capsys):
    import json

    from streamssl.train.api import run_training

    # An untrained head (lr 1e-9) predicts no better than the best constant guess, BEST-RQ's chance.
    config = pretrain_config("bestrq", "llsa", corpus, steps=4, sets=[("lr", 1e-9)])
    run_training("pretrain", config, str(tmp_path / "run"), progress=False)
    log = capsys.readouterr().out
    assert "WARNING: pretraining is not learning" in log and "collapsed" not in log
    health = json.loads((tmp_path / "run" / "summary.json").read_text())["health"]
    assert health["source"] == "train" and health["accuracy"] < 1.5 * health["chance"]
    assert any("not learning" in w for w in health["warnings"])
    assert 0.0 < health["masked_fraction"] < 1.0 and health["codebook_entries"] == 16


def test_a_two_entry_codebook_logs_the_collapse_warning(corpus, tmp_path, capsys):
    import json

    from streamssl.train.api import run_training

    config = pretrain_config("bestrq", "llsa", corpus, steps=3,
                             sets=[("objective_options", {"codebook_entries": 2, "mask_length": 2})])
    run_training("pretrain", config, str(tmp_path / "run"), progress=False)
    assert "WARNING: codes collapsed" in capsys.readouterr().out
    health = json.loads((tmp_path / "run" / "summary.json").read_text())["health"]
    assert health["code_perplexity"] < 2.0 and any("collapsed" in w for w in health["warnings"])


def test_selective_fine_tuning_starts_from_a_bestrq_checkpoint(corpus, tmp_path):
    from streamssl.train.api import build_config, run_training
    from streamssl.train.checkpoint import load_checkpoint

    run_training("pretrain", pretrain_config("bestrq", "sa", corpus, steps=2), str(tmp_path / "pt"), progress=False)
    finetune = build_config("finetune", "tiny", None, [("max_batch_seconds", 2.5), ("steps", 2)], train_data=corpus,
                            init=str(tmp_path / "pt"), train_mode="replace", replace_layers="last:1",
                            replace_mixer="wsm")
    run_training("finetune", finetune, str(tmp_path / "ft"), progress=False)
    pre = load_checkpoint(tmp_path / "pt", kind="pretrain").model.encoder.state_dict()
    model = load_checkpoint(tmp_path / "ft", kind="finetune").model
    fine = model.encoder.state_dict()
    assert type(model.encoder.stack.blocks[-1].mixer).__name__ != type(
        load_checkpoint(tmp_path / "pt").model.encoder.stack.blocks[-1].mixer).__name__
    # Everything outside the replaced layer is the pretrained encoder, unchanged by selective training.
    for name in ("frontend.normalizer.mean", "feature_proj.weight", "stack.blocks.0.mixer.qkv.weight"):
        assert torch.equal(pre[name], fine[name]), name


@pytest.mark.parametrize("bad, message", [
    ({"objective": "hubert"}, "unknown objective 'hubert'; registered objectives: \\['bestrq', 'wav2vec2'\\]"),
    ({"objective_options": {"noise_std": 0.1}}, "objective 'wav2vec2' does not read option\\(s\\) \\['noise_std'\\]"),
    ({"objective": "bestrq", "objective_options": {"num_negatives": 5}},
     "objective 'bestrq' does not read option\\(s\\) \\['num_negatives'\\]"),
    ({"objective": "bestrq", "mask_prob": 0.3}, "PretrainConfig has no field\\(s\\) \\['mask_prob'\\]: the options of "
                                                "objective 'bestrq' go in objective_options"),
    ({"objective": "bestrq", "objective_options": {"noise_std": -1.0}}, "noise_std"),
    ({"objective": "bestrq", "objective_options": "big"}, "objective_options must be a mapping"),
])
def test_bad_objective_configs_are_refused(bad, message):
    from streamssl.train.config import PretrainConfig, preset

    with pytest.raises(ValueError, match=message):
        PretrainConfig.from_dict(bad, base=preset("pretrain", "tiny-fbank"))


def test_bestrq_on_the_waveform_frontend_is_refused_when_the_model_is_built(corpus, tmp_path):
    from streamssl.train.api import build_config, run_training

    config = build_config("pretrain", "tiny", None, [("objective", "bestrq")], train_data=corpus)
    with pytest.raises(ValueError, match="frontend 'conv' has none"):
        run_training("pretrain", config, str(tmp_path / "run"), progress=False)
