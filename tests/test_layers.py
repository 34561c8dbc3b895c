"""Imports run one way: no cycles between modules of ``src/streamssl``, no module importing a higher layer.

Every ``import`` statement counts, also the ones inside functions. The layers, low to high, are the
ranks of :data:`LAYERS`; a module not named there fails the test until it is given a layer.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Module (or package prefix) -> rank. The longest matching prefix wins.
LAYERS: dict[str, int] = {
    # 0 core: configuration, frontends, mixers, the encoder, latency, span masks, speech data.
    "streamssl": 0, "streamssl.config": 0, "streamssl.frontend": 0, "streamssl.frontends": 0,
    "streamssl.mixers": 0, "streamssl.encoder": 0, "streamssl.latency": 0, "streamssl.masking": 0,
    "streamssl.data": 0,
    #   The runtime's kaldi-native-fbank log-mel (numpy), which the fbank frontend wraps.
    "streamssl.runtime.logmel": 0,
    # 1 objectives and heads: self-supervised objectives, CTC recognition, attention replacement and
    #   Hugging Face encoders (training's --replace and --init hf: use them).
    "streamssl.objectives": 1, "streamssl.asr": 1, "streamssl.selective": 1,
    #   The batched streaming core drives a CTC model and its decoders; evaluation streams through it, and
    #   the recogniser and server build on it.
    "streamssl.streaming.engine": 1, "streamssl.streaming.torch_model": 1,
    #   The torch-free runtime: an export run by ONNX Runtime, with the vocabulary and greedy decoder.
    "streamssl.runtime": 1,
    # 2 training: run configs, trainer, checkpoints, data pipeline, DDP.
    "streamssl.train": 2,
    # 3 applications: command line, streaming recogniser, demo, export, server.
    "streamssl.__main__": 3, "streamssl.cli": 3, "streamssl.commands": 3, "streamssl.tables": 3,
    "streamssl.streaming": 3, "streamssl.demo": 3, "streamssl.export": 3, "streamssl.serve": 3,
}
LAYER_NAMES = ("core", "objectives/asr", "train", "applications")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "streamssl") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports anywhere in its source (``root`` holds ``package/``).

    ``from a import b`` points at ``a.b`` when that is a module, else at ``a``.
    """
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    packages = {module_name(p, root) for p in files.values() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = name if name in packages else name.rpartition(".")[0]
                    base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in files else source)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def rank(module: str) -> int:
    """The layer of ``module``: its own entry or its longest package prefix (the bare root names only
    ``streamssl/__init__.py``, so a new top-level module must be given a layer)."""
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def problems(graph: dict[str, set[str]]) -> list[str]:
    """Unranked modules, imports of a higher layer, and one import cycle if there is any."""
    found = []
    for module in sorted(graph):
        try:
            rank(module)
        except KeyError:
            found.append(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for target in sorted(graph[module]):
            try:
                higher = rank(target) > rank(module)
            except KeyError:
                continue  # reported as unranked on its own
            if higher:
                found.append(f"{module} ({LAYER_NAMES[rank(module)]}) imports {target} "
                             f"({LAYER_NAMES[rank(target)]})")
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        found.append("import cycle: " + " -> ".join(reversed(error.args[1])))
    return found


def test_streamssl_imports_run_one_way():
    assert problems(import_graph(SRC)) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "streamssl/__init__.py": "from streamssl.encoder import Encoder\n",
    "streamssl/encoder.py": "import torch\nfrom streamssl import masking\n",
    "streamssl/masking.py": "",
    "streamssl/train/__init__.py": "",
    "streamssl/train/trainer.py": "from ..encoder import Encoder\nfrom . import checkpoint\n",
    "streamssl/train/checkpoint.py": "from streamssl.asr.ctc import CTCModel\n",
    "streamssl/asr/__init__.py": "",
    "streamssl/asr/ctc.py": "from streamssl.masking import span_mask\n",
    "streamssl/cli.py": "def main():\n    from streamssl.train import trainer\n",
}


def test_checker_passes_a_clean_tree_and_resolves_relative_imports(tmp_path):
    graph = import_graph(write(tmp_path, CLEAN))
    assert graph["streamssl.train.trainer"] == {"streamssl.encoder", "streamssl.train.checkpoint"}
    assert graph["streamssl.encoder"] == {"streamssl.masking"}
    assert graph["streamssl.cli"] == {"streamssl.train.trainer"}
    assert problems(graph) == []


@pytest.mark.parametrize("planted, expected", [
    ({"streamssl/masking.py": "def f():\n    from streamssl.train.trainer import x\n"},
     "streamssl.masking (core) imports streamssl.train.trainer (train)"),
    ({"streamssl/asr/ctc.py": "from ..cli import main\n"},
     "streamssl.asr.ctc (objectives/asr) imports streamssl.cli (applications)"),
    ({"streamssl/masking.py": "import streamssl.encoder\n"},
     "import cycle: "),
    ({"streamssl/newthing.py": ""}, "streamssl.newthing has no layer"),
])
def test_checker_fails_a_planted_violation(tmp_path, planted, expected):
    found = problems(import_graph(write(tmp_path, {**CLEAN, **planted})))
    assert any(problem.startswith(expected) for problem in found), found


def test_importing_the_core_loads_only_core_modules():
    code = "import sys, streamssl.mixers; print(' '.join(m for m in sys.modules if m.startswith('streamssl')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)}).stdout.split()
    assert "streamssl.mixers.base" in loaded
    assert [m for m in loaded if rank(m) > 0] == []


# What deploys an export without PyTorch: none of these may import torch, also not through another module.
TORCH_FREE = ("streamssl.runtime.model", "streamssl.runtime.logmel", "streamssl.streaming.engine",
              "streamssl.streaming.recognizer", "streamssl.streaming.report", "streamssl.streaming.endpoint",
              "streamssl.serve.server", "streamssl.asr.lexicon", "streamssl.data.audio", "streamssl.cli",
              "streamssl.commands.stream", "streamssl.commands.serve")


def test_the_runtime_modules_import_no_torch():
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {TORCH_FREE!r}]; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)}).stdout.strip()
    assert loaded == "[]"
