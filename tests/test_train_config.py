"""Run configurations: objective options in one place, configurations and checkpoints of the older layout,
flags that would be silently ignored, and run folders that name each layer's real mixer."""

import json

import pytest
import torch
import yaml
from train_corpus import make_corpus

from streamssl.cli import main
from streamssl.objectives import Wav2Vec2Options
from streamssl.train.api import build_config, run_training
from streamssl.train.checkpoint import load_checkpoint, read_payload, save_checkpoint
from streamssl.train.config import LEGACY_WAV2VEC2_FIELDS, PretrainConfig

# What PretrainConfig.to_dict() wrote for wav2vec 2.0's options before objective_options held them: every
# one a top-level field (these are the tiny preset's values), objective_options empty.
OLD_WAV2VEC2_FIELDS = dict(mask_prob=0.5, mask_length=2, num_negatives=5, logit_temperature=0.1, codebook_groups=2,
                           codebook_entries=8, final_dim=16, gumbel_start=2.0, gumbel_end=0.5, gumbel_decay=0.999995,
                           diversity_weight=0.1, feature_penalty_weight=10.0, feature_grad_scale=1.0)
# The BASE defaults of those fields, which an older BEST-RQ configuration carried unread.
OLD_DEFAULTS = dict(mask_prob=0.65, mask_length=10, num_negatives=100, logit_temperature=0.1, codebook_groups=2,
                    codebook_entries=320, final_dim=256, gumbel_start=2.0, gumbel_end=0.5, gumbel_decay=0.999995,
                    diversity_weight=0.1, feature_penalty_weight=10.0, feature_grad_scale=0.1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(make_corpus(tmp_path_factory.mktemp("corpus"), n=6))


def old_layout(task_config: dict) -> dict:
    """``task_config`` (the current layout) as streamssl wrote it before the change."""
    old = dict(task_config)
    options = old.pop("objective_options")
    if old["objective"] == "wav2vec2":
        return {**old, "objective_options": {}, **options}
    return {**old, "objective_options": options, **OLD_DEFAULTS}


def test_both_objectives_take_their_options_from_objective_options():
    w2v = build_config("pretrain", "cpu-small", None, [("objective_options.mask_prob", 0.3)])
    bestrq = build_config("pretrain", "cpu-fbank-bestrq", None, [("objective_options.mask_prob", 0.3)])
    # One entry changes; the preset's other options stay, and the options dataclass is the one the model gets.
    assert w2v.parsed_objective_options().mask_prob == bestrq.parsed_objective_options().mask_prob == 0.3
    assert w2v.parsed_objective_options().num_negatives == 50
    assert bestrq.parsed_objective_options().codebook_entries == 1024
    # After construction the mapping spells out every option of the objective, defaults included.
    assert sorted(bestrq.objective_options) == ["codebook_dim", "codebook_entries", "codebooks", "mask_length",
                                                "mask_prob", "noise_std", "quantizer_seed"]
    assert bestrq.objective_options["quantizer_seed"] == 0
    # A layer that changes the objective starts from that objective's defaults, not the preset's options.
    switched = build_config("pretrain", "cpu-small", None, [("objective", "bestrq")])
    assert switched.objective_options["codebook_entries"] == 8192 and switched.objective_options["mask_prob"] == 0.45


def test_an_option_the_objective_does_not_read_is_refused_by_the_command(corpus, tmp_path, capsys):
    for sets, named in ((["mask_prob=0.3"], "no field(s) ['mask_prob']"),
                        (["objective_options.num_negatives=5"], "does not read option(s) ['num_negatives']")):
        argv = ["pretrain", "--preset", "tiny-bestrq", "--train", corpus, "--out", str(tmp_path / "run")]
        assert main(argv + [a for s in sets for a in ("--set", s)]) == 2
        err = capsys.readouterr().err
        assert named in err and "objective 'bestrq'" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_configs_of_the_older_layout_still_load(tmp_path):
    old = {"steps": 10, "objective": "wav2vec2", "objective_options": {}, **OLD_WAV2VEC2_FIELDS}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    for config in (PretrainConfig.from_dict(old), PretrainConfig.load(tmp_path / "config.yaml")):
        assert config.parsed_objective_options() == Wav2Vec2Options(**OLD_WAV2VEC2_FIELDS)
        assert config.steps == 10
    # A hand-written older file that sets a few of them: they still go where they belong.
    partial = build_config("pretrain", "cpu-small", None, [("num_negatives", 7), ("feature_grad_scale", 1.0)])
    assert partial.objective_options["num_negatives"] == 7 and partial.objective_options["final_dim"] == 64
    # An older BEST-RQ configuration held every wav2vec 2.0 field at its default, unread: it loads without them.
    bestrq = PretrainConfig.from_dict({"objective": "bestrq", "objective_options": {"codebook_entries": 16},
                                       **OLD_DEFAULTS})
    assert bestrq.objective_options["codebook_entries"] == 16 and bestrq.objective_options["mask_prob"] == 0.45
    assert set(LEGACY_WAV2VEC2_FIELDS) == set(OLD_DEFAULTS) and not set(LEGACY_WAV2VEC2_FIELDS) & set(bestrq.to_dict())
    with pytest.raises(ValueError, match="given both as top-level fields and in objective_options"):
        PretrainConfig.from_dict({"mask_prob": 0.3, "objective_options": {"mask_prob": 0.4}})


@pytest.mark.parametrize("preset", ["tiny", "tiny-bestrq"])
def test_a_checkpoint_of_the_older_layout_loads_and_resumes(preset, corpus, tmp_path):
    config = build_config("pretrain", preset, None, [("max_batch_seconds", 2.5), ("log_every", 1)],
                          train_data=corpus, steps=3)
    run_training("pretrain", config, str(tmp_path / "run"), stop_after=2, progress=False)
    payload = read_payload(tmp_path / "run")
    payload["task_config"] = old_layout(payload["task_config"])
    save_checkpoint(tmp_path / "run" / "checkpoint.pt",
                    {k: v for k, v in payload.items() if k not in ("format", "version")})

    loaded = load_checkpoint(tmp_path / "run", kind="pretrain")
    assert loaded.step == 2 and loaded.config.to_dict() == config.to_dict()
    # The resumed run takes the older checkpoint as the same configuration and finishes it.
    run_training("pretrain", config, str(tmp_path / "run"), progress=False)
    assert load_checkpoint(tmp_path / "run").step == 3


def test_mixer_without_replace_is_refused(corpus, tmp_path, capsys):
    for mode in ([], ["--frozen"]):
        code = main(["finetune", "--preset", "tiny", "--mixer", "wsm", *mode, "--train", corpus,
                     "--out", str(tmp_path / "ft"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert "--mixer wsm is the mixer of the layers --replace LAYERS replaces" in err
    assert not (tmp_path / "ft").exists()


def test_a_replace_run_names_each_layers_mixer(corpus, tmp_path, capsys):
    pretrain = build_config("pretrain", "tiny", None, [("encoder.mixer", "sa"), ("encoder.n_layers", 3),
                                                       ("encoder.right_frames", 2), ("max_batch_seconds", 2.5)],
                            train_data=corpus, steps=1)
    run_training("pretrain", pretrain, str(tmp_path / "pt"), progress=False)
    assert main(["finetune", "--preset", "tiny", "--init", str(tmp_path / "pt"), "--replace", "last:1",
                 "--mixer", "wsm", "--set", "max_batch_seconds=2.5", "--steps", "1", "--train", corpus,
                 "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    assert "finetune: sa+wsm(last:1) encoder" in capsys.readouterr().out

    encoder = yaml.safe_load((tmp_path / "ft" / "encoder.yaml").read_text())
    assert encoder["mixer"] == "sa" and encoder["layer_mixers"] == ["sa", "sa", "wsm"]
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["mixer"] == "sa+wsm(last:1)"
    checkpoint = load_checkpoint(tmp_path / "ft", kind="finetune")
    assert checkpoint.mixer_label == "sa+wsm(last:1)"
    assert type(checkpoint.model.encoder.stack.blocks[2].mixer).__name__ != type(
        checkpoint.model.encoder.stack.blocks[1].mixer).__name__
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ft"), "--data", corpus, "--decoder", "greedy"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("sa+wsm(last:1)  offline")
    # The latency command measures the replaced run as built, not the encoder it started from.
    assert main(["latency", "--config", str(tmp_path / "ft"), "--json"]) == 0
    latency = json.loads(capsys.readouterr().out)
    assert latency["mixer"] == "sa+wsm(last:1)"
    assert latency["encoder_lookahead_frames"] == checkpoint.model.encoder.stack.lookahead_frames()
    assert main(["latency", "--config", str(tmp_path / "ft" / "encoder.yaml")]) == 2
    assert "give its run folder, with its checkpoint.pt" in capsys.readouterr().err
    # A run that replaces nothing keeps the one name and writes no layer list.
    pretrained = yaml.safe_load((tmp_path / "pt" / "encoder.yaml").read_text())
    assert pretrained["mixer"] == "sa" and "layer_mixers" not in pretrained
    assert json.loads((tmp_path / "pt" / "summary.json").read_text())["threads"] == torch.get_num_threads()


def test_a_layer_that_changes_the_objective_takes_none_of_the_lower_layers_options():
    switched = build_config("pretrain", "tiny", None, [("objective", "bestrq"),
                                                       ("objective_options", {"codebook_entries": 32})])
    assert switched.objective_options == {"codebook_entries": 32, "codebook_dim": 16, "codebooks": 1,
                                          "mask_prob": 0.45, "mask_length": 4, "noise_std": 0.1, "quantizer_seed": 0}
