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
        from streamssl.train.config import PRESETS

        assert f"{kind} needs a starting point: --preset {'|'.join(sorted(PRESETS[kind]))}" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- issue 22, as a new user
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from train_corpus import make_corpus  # noqa: E402

from streamssl.train.checkpoint import build_model, save_checkpoint  # noqa: E402
from streamssl.train.config import PRESETS, preset  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny finetune checkpoint (conv frontend: a frame hop of 320 samples, 20 ms)."""
    config = preset("finetune", "tiny")
    torch.manual_seed(0)
    model = build_model("finetune", config, config.encoder)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(path, {"kind": "finetune", "encoder_config": config.encoder.to_dict(),
                           "task_config": config.to_dict(), "vocab": model.vocab.symbols,
                           "model": model.state_dict(), "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}})
    return path


@pytest.fixture
def one_thread():
    yield
    torch.set_num_threads(1)


def test_evaluate_takes_threads_and_shows_progress_on_stderr_with_json(checkpoint, tmp_path, capsys, one_thread):
    manifest = make_corpus(tmp_path / "corpus", n=3)
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(manifest), "--decoder", "greedy", "--json"]
    code, out, err = run([*argv, "--streaming", "--threads", "2"], capsys)
    assert code == 0 and torch.get_num_threads() == 2
    assert json.loads(out)["n_utterances"] == 3  # stdout is the JSON alone
    assert "evaluate: decoding 3 utterance(s)" in err and "streaming in 40 ms chunks" in err and "2 thread(s)" in err
    code, out, err = run([*argv, "--quiet"], capsys)
    assert code == 0 and json.loads(out)["n_utterances"] == 3 and err == ""
    for threads in ("0", "-3"):
        code, out, err = run([*argv, "--threads", threads], capsys)
        assert (code, out, err) == (2, "", f"streamssl evaluate: error: --threads must be at least 1, got {threads}\n")


def test_serve_on_a_port_in_use_and_with_zero_threads_says_so_in_one_line(checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(["serve", "--checkpoint", str(checkpoint), "--port", str(port)], capsys)
    assert code == 2
    assert err == f"streamssl serve: error: port {port} on 127.0.0.1 is in use; pick another with --port\n"
    code, _, err = run(["serve", "--checkpoint", str(checkpoint), "--threads", "0"], capsys)
    assert (code, err) == (2, "streamssl serve: error: --threads must be at least 1, got 0\n")


@pytest.mark.parametrize("argv", [["stream", "a.wav"], ["evaluate", "--data", "none", "--streaming"], ["serve"],
                                  ["export", "--out", "x.onnx"]], ids=lambda argv: argv[0])
@pytest.mark.parametrize("value, problem", [("inf", "must be a finite number of milliseconds, got inf"),
                                            ("nan", "must be a finite number of milliseconds, got nan"),
                                            ("0", "must be positive, got 0")])
def test_non_finite_or_non_positive_chunk_ms_is_refused_while_parsing(argv, value, problem, capsys):
    # The checkpoint does not exist: the flag is refused before anything is loaded.
    code, out, err = run([*argv, "--checkpoint", "none.pt", "--chunk-ms", value], capsys)
    command = argv[0]
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"streamssl {command}: error: --chunk-ms {problem}")


def test_a_chunk_shorter_than_one_frame_is_refused_with_the_hop(checkpoint, tmp_path, capsys):
    audio = tmp_path / "a.wav"
    soundfile.write(audio, np.zeros(1600, dtype=np.float32), 16000)
    manifest = make_corpus(tmp_path / "corpus", n=1)
    refusal = ("--chunk-ms {} is shorter than one frame hop of this model (20 ms = 320 samples); "
               "use --chunk-ms 20 or more\n")
    for argv in (["stream", str(audio)], ["evaluate", "--data", str(manifest), "--streaming", "--quiet"]):
        for chunk_ms in ("0.01", "19"):
            code, out, err = run([*argv, "--checkpoint", str(checkpoint), "--chunk-ms", chunk_ms], capsys)
            assert (code, out) == (2, "") and err == f"streamssl {argv[0]}: error: " + refusal.format(chunk_ms)
    code, out, _ = run(["stream", str(audio), "--checkpoint", str(checkpoint), "--chunk-ms", "20", "--json"], capsys)
    assert code == 0 and json.loads(out)["files"][0]["audio_s"] == pytest.approx(0.1)


def test_stream_names_the_file_of_loud_or_nan_float_audio(checkpoint, tmp_path, capsys):
    t = np.arange(16000) / 16000
    loud = tmp_path / "loud.wav"
    soundfile.write(loud, (3.0 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="FLOAT")
    unscaled = tmp_path / "unscaled.wav"
    soundfile.write(unscaled, np.round(8000 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000,
                    subtype="FLOAT")
    broken = tmp_path / "nan.wav"
    samples = np.zeros(16000, dtype=np.float32)
    samples[8000] = np.nan
    soundfile.write(broken, samples, 16000, subtype="FLOAT")
    code, out, err = run(["stream", "--checkpoint", str(checkpoint), str(loud), str(unscaled), str(broken),
                          "--json", "--quiet"], capsys)
    assert code == 1 and json.loads(out)["files"] == []
    lines = err.splitlines()
    assert lines[0].startswith(f"streamssl stream: error: {loud}: float samples exceed [-1, 1] (peak 3.0 at ")
    assert lines[0].endswith("scale the audio into [-1, 1], e.g. divide it by its peak") and "32768" not in lines[0]
    assert lines[1].startswith(f"streamssl stream: error: {unscaled}: float samples exceed [-1, 1] (peak 8000.0 ")
    assert lines[1].endswith("the values are whole numbers, as int16 PCM stored as floats: divide them by 32768")
    assert lines[2] == f"streamssl stream: error: {broken}: samples are NaN or infinite (the first at 0.500 s)"


def test_version_prints_the_package_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"streamssl {metadata.version('streamssl')}\n"


@pytest.mark.parametrize("argv", [["--help"], ["stream", "--help"], ["export", "--help"], ["corpus", "--help"]])
def test_help_imports_neither_torch_nor_numpy(argv):
    # What made --help take seconds: the package and every command imported torch before parsing.
    probe = ("import sys; from streamssl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted({'torch', 'numpy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert "usage: streamssl" in result.stdout and result.stdout.splitlines()[-1] == "[]"


def test_latency_takes_every_training_preset(capsys):
    from streamssl.encoder import declared_latency

    names = sorted(set(PRESETS["pretrain"]) | set(PRESETS["finetune"]))
    assert len(names) == 8
    for name in names:
        code, out, _ = run(["latency", "--preset", name, "--json"], capsys)
        kind = "pretrain" if name in PRESETS["pretrain"] else "finetune"
        assert code == 0 and json.loads(out) == declared_latency(preset(kind, name).encoder).to_dict(), name
    assert json.loads(run(["latency", "--preset", "cpu-small", "--json"], capsys)[1])["total_lookahead_ms"] == 95


def test_usage_errors_are_one_line_and_return_2(capsys):
    code, out, err = run(["stream"], capsys)
    assert (code, out) == (2, "")
    assert err == "streamssl stream: error: the following arguments are required: FILE (see 'streamssl stream --help')\n"
    code, out, err = run(["stream", "talk.wav"], capsys)
    assert (code, out) == (2, "")
    assert err == ("streamssl stream: error: one of the arguments --checkpoint --model is required "
                   "(see 'streamssl stream --help')\n")
    code, _, err = run(["evaluate", "--checkpoint", "c", "--data", "d", "--threads", "two"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--threads: invalid int value: 'two'" in err
