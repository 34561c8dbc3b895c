"""Every script in benchmarks/ runs at its smoke size (``--smoke``), so that an API change that breaks one
fails here rather than on the next full measurement; and ``make bench`` runs every one of them."""

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
PUBLISHED = ROOT / "docs" / "benchmarks"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem != "common")
# What each smoke run writes into --out.
OUTPUTS = {
    "attention_memory": {"attention_memory_cpu.json", "attention_memory_cpu.png"},
    "checkpoint_memory": {"checkpoint_memory.json", "checkpoint_memory.png"},
    "device_check": {"device_check_cpu.json"},
    "decoding": {"decoding.json"},
    "emission_delay": {"emission_delay.json", "emission_delay.png"},
    "memory_mixers": {"memory_mixers.json", "memory_mixers.png"},
    "runtime_rtf": {"runtime_rtf.json"},
    "selective_memory": {"selective_memory_cpu.json"},
    "serve_load": {"serve_load.json", "serve_load.png"},
    "serve_soak": {"serve_soak.json", "serve_soak.png"},
    "step_speed": {"step_speed.json", "step_speed.png"},
    "streaming_eval": {"streaming_eval.json"},
    "streaming_rtf": {"streaming_rtf.json", "streaming_rtf.png"},
    "summary_mixers": {"summary_mixers.json", "summary_mixers.png"},
    "train_throughput": {"train_throughput.json", "train_throughput.png"},
    "whisper_peer": {"whisper_peer.json"},
}
NEEDS = {"selective_memory": "transformers"}


def common_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import common
    finally:
        sys.path.remove(str(BENCHMARKS))
    return common


def numbers_and_errors(data, path="") -> tuple[list[tuple[str, float]], list[str]]:
    """Every number in a results JSON with its path, and the paths of every ``error`` entry."""
    numbers, errors = [], []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "error":
                errors.append(f"{path}: {value}")
            found, bad = numbers_and_errors(value, f"{path}.{key}")
            numbers += found
            errors += bad
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found, bad = numbers_and_errors(value, f"{path}[{i}]")
            numbers += found
            errors += bad
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        numbers.append((path, float(data)))
    return numbers, errors


def test_every_script_has_a_smoke_check():
    assert SCRIPTS == sorted(OUTPUTS)


def test_make_bench_runs_every_script():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    assert sorted(set(re.findall(r"benchmarks/(\w+)\.py", recipe))) == SCRIPTS


def test_smoke_options_replace_defaults_and_write_outside_the_published_results():
    common = common_module()

    def parse(argv):
        parser = argparse.ArgumentParser()
        parser.add_argument("--frames", type=int, nargs="+", default=[500, 1000])
        parser.add_argument("--seconds", type=float, default=8.0)
        common.add_common_options(parser)
        return common.parse_args(parser, smoke=dict(frames=[64], seconds=1.0), argv=argv)

    full = parse([])
    assert (full.frames, full.seconds, full.out, full.smoke) == ([500, 1000], 8.0, PUBLISHED, False)
    smoke = parse(["--smoke", "--seconds", "2"])
    assert (smoke.frames, smoke.seconds) == ([64], 2.0)
    assert smoke.out.is_dir() and not list(smoke.out.iterdir())
    assert PUBLISHED not in smoke.out.parents and ROOT not in smoke.out.parents
    smoke.out.rmdir()
    assert parse(["--smoke", "--out", "elsewhere"]).out == Path("elsewhere")


def test_whisper_peer_normalises_any_hypothesis_as_the_corpus_does():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from whisper_peer import normalize_hypothesis
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert normalize_hypothesis(" It costs $3.50, said Dr. Smith-Jones in 1990. ♪") == \
        "IT COSTS THREE DOLLARS AND FIFTY CENTS SAID DR SMITH JONES IN ONE THOUSAND NINE HUNDRED AND NINETY"
    assert normalize_hypothesis("你好") == ""


def published_state() -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in PUBLISHED.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(OUTPUTS))
def test_smoke_run(script, tmp_path):
    if script in NEEDS and importlib.util.find_spec(NEEDS[script]) is None:
        pytest.skip(f"{script}.py needs {NEEDS[script]}, which is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    before = published_state()
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script}.py --smoke failed:\n{done.stderr[-3000:]}"
    assert published_state() == before, "a smoke run changed docs/benchmarks/"
    assert {path.name for path in tmp_path.iterdir()} == OUTPUTS[script]
    for name in OUTPUTS[script]:
        if name.endswith(".json"):
            numbers, errors = numbers_and_errors(json.loads((tmp_path / name).read_text()))
            assert not errors, f"{name} holds failed points: {errors}"
            assert numbers, f"{name} holds no numbers"
            assert all(math.isfinite(value) for _, value in numbers), \
                f"{name} holds non-finite numbers: {[p for p, v in numbers if not math.isfinite(v)]}"
        else:
            assert (tmp_path / name).stat().st_size > 1000, f"{name} is (nearly) empty"
    if script == "step_speed":
        assert "torchaudio Emformer skipped: no --torchaudio-wheel given" in done.stderr
    if script == "runtime_rtf":
        assert [row["same_transcript"] for row in json.loads((tmp_path / "runtime_rtf.json").read_text())["rows"]] == [True]
    if script == "serve_load":
        row = json.loads((tmp_path / "serve_load.json").read_text())["rows"][0]
        assert (row["clients"], row["correct"], row["failures"]) == (2, 2, [])
    if script == "serve_soak":
        summary = json.loads((tmp_path / "serve_soak.json").read_text())["summary"]
        assert summary["sessions"] >= 2 and summary["sessions_equal"] == summary["sessions"]
        assert (summary["lost_words"], summary["added_words"], summary["failures"]) == (0, 0, [])
    if script == "whisper_peer":
        result = json.loads((tmp_path / "whisper_peer.json").read_text())
        ours = [(row["mode"], row["decoder"]) for row in result["rows"] if row["system"] == "streamssl"]
        assert ours == [("offline", "greedy"), ("offline", "lexicon"), ("streaming 40 ms", "greedy"),
                        ("streaming 40 ms", "lexicon")]
        whisper = [row for row in result["rows"] if row["system"].startswith("Whisper")]
        assert len(whisper) == (0 if result["whisper_skipped"] else 1)
    if script == "streaming_eval":
        result = json.loads((tmp_path / "streaming_eval.json").read_text())
        assert [row["same_as_first"] for row in result["batching"]["rows"]] == [2, 2, 2, 2]
        assert [row["same_as_evaluate_batch_1"] for row in result["paths"]["rows"]] == [2, 2, 2, 2]
