"""Every recipe YAML builds a run configuration that does what the file says: each value it sets reaches the
run, its encoders declare the look-ahead docs/methods.md gives, and the runs it chains find each other."""

import re
from pathlib import Path

import pytest
import yaml

from streamssl import Encoder
from streamssl.frontends import frontend_class
from streamssl.train.api import build_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*/*.yaml"))


def assert_reaches(written, resolved, where: str) -> None:
    """Every value of ``written`` (from a recipe file) is in ``resolved`` (the run's configuration as plain
    data), at the same place."""
    if isinstance(written, dict):
        assert isinstance(resolved, dict), f"{where}: the recipe sets a mapping, the run has {resolved!r}"
        for key, value in written.items():
            assert key in resolved, f"{where}.{key} is in the recipe but not in the run's configuration"
            assert_reaches(value, resolved[key], f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(resolved, list) and len(resolved) == len(written), \
            f"{where}: the recipe sets {written!r}, the run has {resolved!r}"
        for i, (value, got) in enumerate(zip(written, resolved)):
            assert_reaches(value, got, f"{where}[{i}]")
    else:
        assert written == resolved, f"{where}: the recipe sets {written!r}, the run has {resolved!r}"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_value_a_recipe_sets_reaches_the_run(path):
    kind = "pretrain" if path.name.startswith("pretrain") else "finetune"
    config = build_config(kind, "base", str(path), []).to_dict()
    written = yaml.safe_load(path.read_text())
    encoder = written.pop("encoder", None)
    assert_reaches(written, config, path.name)
    if encoder is None:
        return
    # An older frontend field (conv_channels) lands in frontend_options under the frontend's own name.
    legacy = frontend_class(config["encoder"]["frontend"]).legacy_keys
    for key, value in encoder.items():
        if key in legacy:
            assert_reaches(value, config["encoder"]["frontend_options"][legacy[key]], f"{path.name}.encoder.{key}")
        else:
            assert_reaches({key: value}, config["encoder"], f"{path.name}.encoder")


@pytest.mark.parametrize("name, frontend_ms", [("pretrain.yaml", 5.0), ("pretrain_fbank.yaml", 15.0)])
def test_librispeech_encoders_declare_the_papers_160_ms(name, frontend_ms):
    """docs/methods.md section 2: 8 frames of 20 ms per LLSA layer declare 0.16 s whatever the depth, and the
    log-mel variant keeps it with 4 frames of 40 ms; the frontend adds its window minus its hop (section 1):
    25 - 20 = 5 ms for conv, 25 - 10 = 15 ms for fbank."""
    latency = Encoder(build_config("pretrain", "base", str(RECIPES / "librispeech" / name), []).encoder).latency()
    assert latency.encoder_lookahead_ms == pytest.approx(160.0)
    assert latency.total_lookahead_ms - latency.encoder_lookahead_ms == pytest.approx(frontend_ms)


@pytest.mark.parametrize("finetune, pretrain", [("finetune.yaml", "pretrain.yaml"),
                                                ("finetune_fbank.yaml", "pretrain_fbank.yaml")])
def test_librispeech_finetuning_starts_from_what_its_pretraining_command_writes(finetune, pretrain):
    """The ``init`` of each fine-tuning recipe is the checkpoint of the run folder that recipes/librispeech/README.md
    gives its pretraining command."""
    commands = (RECIPES / "librispeech" / "README.md").read_text().replace("\\\n", " ")
    out = dict(re.findall(r"--config recipes/librispeech/(\S+\.yaml)\s+--out (\S+)", commands))
    config = build_config("finetune", "base", str(RECIPES / "librispeech" / finetune), [])
    assert Path(config.init) == Path(out[pretrain]) / "checkpoint.pt"


def test_lowresource_recipe_freezes_only_a_pretrained_encoder_at_the_start(tmp_path, monkeypatch):
    """The frozen start protects pretrained weights; on a random encoder it would only waste steps, and the
    probe (frozen mode) gets its own, shorter run. Full runs take finetune.yaml's steps and frozen start."""
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
    written = yaml.safe_load((RECIPES / "lowresource" / "finetune.yaml").read_text())
    assert written["freeze_encoder_steps"] > 0 and recipe.PROBE_STEPS < written["steps"]
    frozen_start = {name: (c.steps, c.freeze_encoder_steps) for name, c in runs.items()}
    assert frozen_start == {"finetune-scratch-full": (written["steps"], 0),
                            "finetune-scratch-frozen": (recipe.PROBE_STEPS, 0),
                            "finetune-w2v-full": (written["steps"], written["freeze_encoder_steps"]),
                            "finetune-w2v-frozen": (recipe.PROBE_STEPS, 0)}


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
