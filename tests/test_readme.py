"""The README's code runs: its Python blocks execute as written (on small stand-ins for the files they
name), and every ``streamssl`` command line in its shell blocks names subcommands and flags that exist."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from train_corpus import make_corpus, tone_audio

from streamssl.cli import main
from streamssl.train.checkpoint import build_model, save_checkpoint
from streamssl.train.config import preset

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
# Blocks that need something no test can make (a downloaded model) name it with this placeholder.
PLACEHOLDER = "path/to/"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding what the README's snippets read: synth/train.jsonl, a fine-tuned checkpoint in
    runs/demo/finetune, and talk.wav."""
    manifest = make_corpus(tmp_path / "synth", n=4)
    manifest.rename(tmp_path / "synth" / "train.jsonl")
    config = preset("finetune", "tiny")
    torch.manual_seed(0)
    model = build_model("finetune", config, config.encoder)
    save_checkpoint(tmp_path / "runs" / "demo" / "finetune" / "checkpoint.pt",
                    {"kind": "finetune", "encoder_config": config.encoder.to_dict(), "task_config": config.to_dict(),
                     "vocab": model.vocab.symbols, "model": model.state_dict(),
                     "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}})
    soundfile.write(tmp_path / "talk.wav", tone_audio("A CAT", np.random.default_rng(0)), 16000)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_code():
    assert len(PYTHON_BLOCKS) >= 5 and len(SHELL_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, workdir, capsys):
    code = PYTHON_BLOCKS[index]
    if PLACEHOLDER in code:
        assert sum(PLACEHOLDER in block for block in PYTHON_BLOCKS) == 1, "only the Hugging Face block may need a model"
        pytest.skip("needs a Hugging Face model downloaded to a local folder")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def command_lines() -> list[list[str]]:
    """Each ``streamssl`` invocation of the shell blocks, as the words after ``streamssl``."""
    lines = []
    for block in SHELL_BLOCKS:
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "streamssl" not in words:
                continue
            lines.append(words[words.index("streamssl") + 1:])
    return lines


def test_shell_blocks_call_streamssl():
    assert len(command_lines()) >= 15


@pytest.mark.parametrize("words", command_lines(), ids=lambda words: " ".join(words[:3]))
def test_shell_command_names_real_subcommands_and_flags(words, capsys):
    path = []
    for word in words:
        if word.startswith("-") or "/" in word or "." in word or word == "...":
            break
        path.append(word)
    with pytest.raises(SystemExit) as exited:
        main([*path, "--help"])
    assert exited.value.code == 0, f"streamssl {' '.join(path)} is not a command"
    help_text = capsys.readouterr().out
    for word in words:
        flag = word.strip("[]").split("=")[0]
        if flag.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"streamssl {' '.join(path)} has no {flag}"
        elif flag.startswith("recipes/"):
            assert (ROOT / flag).exists(), f"{flag} does not exist"
