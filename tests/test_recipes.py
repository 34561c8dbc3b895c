"""Every recipe YAML builds a valid run configuration and an encoder with the look-ahead its comments state."""

from pathlib import Path

import pytest

from streamssl import Encoder
from streamssl.commands.train import build_config

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
