"""Every recipe YAML builds a valid run configuration and an encoder with the look-ahead its comments state."""

from pathlib import Path

import pytest

from streamssl import Encoder
from streamssl.train.api import build_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_config_builds(path):
    kind = "pretrain" if path.name.startswith("pretrain") else "finetune"
    config = build_config(kind, "base", str(path), [])
    assert config.steps > 0


@pytest.mark.parametrize("name, frontend, lookahead_ms", [
    ("pretrain.yaml", "conv", 165.0), ("pretrain_fbank.yaml", "fbank", 175.0)])
def test_librispeech_encoders_keep_160_ms_of_encoder_lookahead(name, frontend, lookahead_ms):
    config = build_config("pretrain", "base", str(RECIPES / "librispeech" / name), [])
    latency = Encoder(config.encoder).latency()
    assert config.encoder.frontend == frontend
    assert latency.encoder_lookahead_ms == 160.0 and latency.total_lookahead_ms == lookahead_ms


def test_librispeech_fbank_finetune_starts_from_the_fbank_pretraining():
    config = build_config("finetune", "base", str(RECIPES / "librispeech" / "finetune_fbank.yaml"), [])
    assert config.init == "runs/librispeech/pretrain-fbank/checkpoint.pt"


def test_lowresource_recipe_freezes_only_a_pretrained_encoder_at_the_start(tmp_path, monkeypatch):
    """The frozen start protects pretrained weights; on a random encoder it would only waste steps, and the
    probe (frozen mode) gets its own, shorter run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lowresource_run", RECIPES / "lowresource" / "run.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    runs = {}
    monkeypatch.setattr(recipe, "run_training", lambda kind, config, run_dir, progress: runs.update({
        Path(run_dir).name: config}))
    data = {"labels": "labels.jsonl", "dev": "dev.jsonl"}
    for init in (None, tmp_path / "pretrain"):
        for mode in ("full", "frozen"):
            recipe.finetune(tmp_path, data, "llsa", init, mode, 1.0, f"{'scratch' if init is None else 'w2v'}-{mode}")
    frozen_start = {name: (c.steps, c.freeze_encoder_steps) for name, c in runs.items()}
    assert frozen_start == {"finetune-scratch-full": (4000, 0), "finetune-scratch-frozen": (1500, 0),
                            "finetune-w2v-full": (4000, 500), "finetune-w2v-frozen": (1500, 0)}


def test_phone_errors_count_a_misspelling_that_sounds_right_as_no_phone_error():
    """recipes/lowresource/phone_errors.py reads both sides with eSpeak NG: FOTO for PHOTO costs characters
    but no phonemes, DOG for CAT costs 3 of the reference's 10 phonemes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("phone_errors", RECIPES / "lowresource" / "phone_errors.py")
    phone_errors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phone_errors)
    reader = phone_errors.Reader("en-us")
    misspelt = phone_errors.phone_scores("misspelt", [("u1", "PHOTO OF A CAT", "FOTO OF A CAT")], reader)
    wrong = phone_errors.phone_scores("wrong", [("u1", "PHOTO OF A CAT", "PHOTO OF A DOG")], reader)
    assert misspelt.cer == pytest.approx(2 / 14) and misspelt.per == 0.0
    assert (misspelt.homophone_share, misspelt.substitutions) == (1.0, 1)
    assert wrong.per == pytest.approx(3 / 10) and (wrong.homophone_share, wrong.substitutions) == (0.0, 1)
    rows = phone_errors.table([wrong, misspelt]).splitlines()
    assert rows[2].startswith("| wrong | 21.4 | - | 30.0 | - |")
    assert rows[3].startswith("| misspelt | 14.3 | +33.3% | 0.0 | +100.0% | 100.0% of 1 |")
