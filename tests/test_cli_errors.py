"""Wrong command-line values end in one line naming the bad value, never a traceback."""

import json

import yaml

from streamssl import EncoderConfig
from streamssl.cli import main


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_latency_config_missing_run_config_and_run_folder(tmp_path, capsys):
    code, _, err = run(["latency", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"--config {tmp_path / 'nope.yaml'}: no such file" in err
    encoder = EncoderConfig.tiny(mixer="sa", right_frames=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    encoder.save(run_dir / "encoder.yaml")
    run_config = tmp_path / "pretrain.yaml"
    run_config.write_text(yaml.safe_dump({"steps": 10, "lr": 1e-3, "encoder": {"mixer": "sa", "right_frames": 3}}))
    latencies = []
    for argv in (["--config", str(run_dir / "encoder.yaml")], ["--config", str(run_dir)],
                 ["--config", str(run_config), "--preset", "tiny"]):
        code, out, _ = run(["latency", *argv, "--json"], capsys)
        assert code == 0
        latencies.append(json.loads(out))
    assert latencies[0] == latencies[1] == latencies[2]
    assert latencies[0]["mixer"] == "sa" and latencies[0]["encoder_lookahead_frames"] == 3 * encoder.n_layers
    run_config.write_text("init: runs/pt/checkpoint.pt\nsteps: 10\n")
    code, _, err = run(["latency", "--config", str(run_config)], capsys)
    assert code == 2 and "takes its encoder from init 'runs/pt/checkpoint.pt'" in err
    run_config.write_text("mixr: sa\n")
    code, _, err = run(["latency", "--config", str(run_config)], capsys)
    assert code == 2 and "mixr" in err


def test_corpus_check_on_an_empty_folder_fails_with_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run(["corpus", "check", str(tmp_path / "empty")], capsys)
    assert code == 1 and "holds no utterances" in err and "0 good utterance(s)" in out


def test_training_needs_a_preset_or_a_config(tmp_path, capsys):
    for kind in ("pretrain", "finetune"):
        code, _, err = run([kind, "--train", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"{kind} needs a starting point: --preset base|cpu-small|tiny" in err
    assert not (tmp_path / "out").exists()
