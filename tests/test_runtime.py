"""The torch-free runtime: an export (``streamssl export``) transcribed by ``streamssl stream --model`` and
served by ``streamssl serve --model`` gives the PyTorch backend's transcripts without importing torch, here
and in a virtual environment holding only the base install (no PyTorch); loading refuses bad files with
a reason."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile
import torch

from streamssl.asr.ctc import CTCModel
from streamssl.cli import main
from streamssl.config import EncoderConfig
from streamssl.data.audio import resample
from streamssl.data.synth import EspeakNG
from streamssl.export import export_model
from streamssl.frontends.fbank import FbankOptions, knf_options
from streamssl.runtime.logmel import LogMel
from streamssl.runtime.model import ExportError, OnnxModel
from streamssl.train.checkpoint import build_model, save_checkpoint
from streamssl.train.config import preset

REPO = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).with_name("runtime_client.py")
# CI sets this, so that a runtime environment that cannot be built fails the test instead of skipping it.
REQUIRE_VENV = os.environ.get("STREAMSSL_REQUIRE_RUNTIME_VENV") == "1"


TASK = preset("finetune", "tiny")
ENCODER = EncoderConfig.tiny(mixer="llsa", frontend="fbank", left_frames=8, right_frames=2)


def tiny_model() -> CTCModel:
    """An untrained tiny fbank LLSA model whose output layer is sharpened, so it writes letters and
    spaces: enough to compare transcripts symbol for symbol."""
    torch.manual_seed(0)
    model = build_model("finetune", TASK, ENCODER).eval()
    with torch.no_grad():
        model.output.weight *= 8
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint, its export at 40 ms chunks, and about 3 s of eSpeak NG speech (16 kHz PCM16)."""
    folder = tmp_path_factory.mktemp("runtime")
    model = tiny_model()
    tts = EspeakNG()
    tts.set_voice("en-us", 170, 50, 50)
    speech = tts.speak("deploy a streaming model without the training stack", seed=1).astype(np.float32) / 32768
    # On the PCM16 grid: the file holds these samples exactly, and so does what a PCM16 client sends.
    audio = np.round(resample(speech, tts.sample_rate, 16000) * 32768).clip(-32768, 32767).astype(np.float32) / 32768
    model.encoder.frontend.fit_normalizer([(torch.from_numpy(audio)[None], torch.tensor([audio.size]))])
    with torch.no_grad():
        # The symbol it writes most becomes the space, so that it writes words.
        best = model(torch.from_numpy(audio)[None])[0][0].argmax(-1)
        common, space = int(best[best != model.vocab.blank].mode().values), model.vocab.index[" "]
        for param in (model.output.weight, model.output.bias):
            param[[common, space]] = param[[space, common]]
    checkpoint = folder / "checkpoint.pt"
    save_checkpoint(checkpoint, {"kind": "finetune", "encoder_config": ENCODER.to_dict(),
                                 "task_config": TASK.to_dict(), "vocab": model.vocab.symbols,
                                 "model": model.state_dict(), "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}})
    onnx_path = folder / "model.onnx"
    export_model(model, 40, onnx_path)
    wav = folder / "speech.wav"
    soundfile.write(wav, audio, 16000, subtype="PCM_16")
    return checkpoint, onnx_path, wav


def cli_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def torch_transcripts(files):
    """What the PyTorch backend gives: ``stream --checkpoint``, greedy and lexicon."""
    checkpoint, _, wav = files
    greedy = cli_json("stream", "--checkpoint", str(checkpoint), str(wav), "--json", "--quiet")
    lexicon = cli_json("stream", "--checkpoint", str(checkpoint), str(wav), "--json", "--quiet",
                       "--decoder", "lexicon", "--lexicon-words", "2000")
    texts = greedy["files"][0]["transcript"], lexicon["files"][0]["transcript"]
    assert len(texts[0].split()) >= 3 and texts[1], f"the test model does not talk enough: {texts}"
    return texts


def run_client(python: str, files, src_path: bool) -> dict:
    _, onnx_path, wav = files
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if src_path:
        env["PYTHONPATH"] = str(REPO / "src")
    result = subprocess.run([python, str(CLIENT), str(onnx_path), str(wav)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_report(report: dict, torch_transcripts) -> None:
    greedy, lexicon = torch_transcripts
    assert report["torch_imported"] is False
    assert report["greedy"] == greedy
    assert report["lexicon"] == lexicon
    assert report["ready"] == "ready" and report["close_code"] == 1000
    # The server hears PCM16 audio; the model's greedy transcript of it is the file's (PCM16 too).
    assert report["served"] == greedy


@pytest.mark.slow
def test_stream_and_serve_model_give_the_torch_transcripts_without_importing_torch(files, torch_transcripts):
    check_report(run_client(sys.executable, files, src_path=True), torch_transcripts)


def runtime_venv() -> Path:
    """A virtual environment with the base install of this checkout (editable, no extras: no PyTorch),
    built once per pyproject.toml/constraints.txt and kept in ``.venv-runtime`` (pip's cache makes a
    rebuild quick)."""
    folder = Path(os.environ.get("STREAMSSL_RUNTIME_VENV", REPO / ".venv-runtime"))
    stamp = folder / ".installed"
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "constraints.txt").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == key:
        return folder
    venv.EnvBuilder(clear=True, with_pip=True).create(folder)
    install = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
               "-e", str(REPO)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"pip install of the runtime failed: {result.stderr[-2000:]}")
    stamp.write_text(key)
    return folder


@pytest.mark.slow
def test_the_base_install_runs_an_export_without_pytorch(files, torch_transcripts):
    try:
        folder = runtime_venv()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        if REQUIRE_VENV:
            raise
        pytest.skip(f"cannot build the runtime virtual environment here ({error}); .ci/run requires it")
    report = run_client(str(folder / "bin" / "python"), files, src_path=False)
    assert report["torch_installed"] is False
    assert report["streamssl"] == str(REPO / "src" / "streamssl")
    check_report(report, torch_transcripts)


def test_a_torch_command_without_torch_says_which_install_it_needs(files, tmp_path):
    """A PyTorch command where torch cannot be imported (simulated: ``torch`` blocked) names the extra."""
    checkpoint, _, wav = files
    code = ("import sys; sys.modules['torch'] = None; from streamssl.cli import main; "
            f"sys.exit(main(['stream', '--checkpoint', {str(checkpoint)!r}, {str(wav)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 2
    assert "streamssl stream: error: this needs PyTorch" in result.stderr
    assert "pip install 'streamssl[train]'" in result.stderr and "--model FILE.onnx" in result.stderr


def test_loading_refuses_files_that_are_no_export_with_the_reason(files, tmp_path):
    checkpoint, onnx_path, _ = files
    with pytest.raises(ExportError, match="no such file"):
        OnnxModel(tmp_path / "missing.onnx")
    not_onnx = tmp_path / "text.onnx"
    not_onnx.write_text("hello")
    with pytest.raises(ExportError, match="text.onnx: not an ONNX model ONNX Runtime can load"):
        OnnxModel(not_onnx)
    proto = onnx.load(onnx_path)
    entry = next(p for p in proto.metadata_props if p.key == "streamssl")
    fields = json.loads(entry.value)

    def variant(name: str, **change) -> Path:
        edited = onnx.load(onnx_path)
        props = next(p for p in edited.metadata_props if p.key == "streamssl")
        props.value = json.dumps({k: v for k, v in {**fields, **change}.items() if v is not None})
        path = tmp_path / name
        onnx.save(edited, path)
        return path

    bare = onnx.load(onnx_path)
    del bare.metadata_props[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ExportError, match="without streamssl metadata; export a checkpoint with `streamssl export`"):
        OnnxModel(tmp_path / "bare.onnx")
    with pytest.raises(ExportError, match="format version 1; this streamssl reads version 2"):
        OnnxModel(variant("old.onnx", format_version=None))
    with pytest.raises(ExportError, match=r"lacks \['vocabulary'\]"):
        OnnxModel(variant("novocab.onnx", vocabulary=None))
    with pytest.raises(ExportError, match="word boundary '_'"):
        OnnxModel(variant("boundary.onnx", word_boundary="_"))
    code = main(["stream", "--checkpoint", str(onnx_path), "x.wav"])
    assert code == 2


def test_the_export_carries_what_rebuilds_the_recogniser(files):
    _, onnx_path, _ = files
    model, info = tiny_model(), OnnxModel(onnx_path).info
    assert info.format_version == 2 and info.word_boundary == " "
    assert info.vocabulary == model.vocab.symbols
    assert info.chunk_ms == 40 and info.chunk_samples == 640 and info.sample_rate == 16000
    assert info.latency["total_lookahead_ms"] == model.latency().total_lookahead_ms
    assert info.features["knf"]["num_bins"] == 80 and info.features["knf"]["dither"] == 0


def test_log_mel_of_streams_sharing_one_extractor_equals_each_stream_framed_alone():
    """Three streams stepped in one batch through one kept knf extractor, in uneven pieces, give every
    stream's offline frames exactly; a copy (which leaves the extractor behind) goes on the same."""
    options = knf_options(FbankOptions(), 16000)
    log_mel = LogMel(options)
    rng = np.random.default_rng(0)
    audios = [(0.1 * rng.standard_normal(12000)).astype(np.float32) for _ in range(3)]
    pending, waiting = np.zeros((3, log_mel.window_samples - 1), np.float32), np.zeros(3, np.int64)
    frames: list[list[np.ndarray]] = [[], [], []]
    fed, sizes = 0, [640, 17, 1000, 160, 3, 399]
    for step in range(40):
        size = sizes[step % len(sizes)]
        if step == 20:
            log_mel = copy.deepcopy(log_mel)
        pieces = [a[fed:fed + size] for a in audios]
        counts = np.array([len(p) for p in pieces], dtype=np.int64)
        chunk = np.stack([np.pad(p, (size - len(p), 0)) for p in pieces])
        mel, new, pending, waiting = log_mel.step(chunk, counts, pending, waiting)
        for b in range(3):
            frames[b].append(mel[b, mel.shape[1] - new[b]:])
        fed += size
    for b, audio in enumerate(audios):
        expected = LogMel(options).frames(audio[:fed])
        assert expected.shape == (73, 80)
        assert np.array_equal(np.concatenate(frames[b]), expected)
