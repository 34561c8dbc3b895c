"""ONNX export of the streaming step and the ONNX Runtime backend, for every streamable mixer."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import stream_frames

from streamssl.asr.ctc import CTCModel
from streamssl.config import EncoderConfig
from streamssl.data.audio import resample
from streamssl.data.synth import EspeakNG
from streamssl.export import export_model, state_names
from streamssl.runtime.model import OnnxModel
from streamssl.mixers import MIXERS
from streamssl.streaming.recognizer import Recognizer

STREAMING = [m for m in sorted(MIXERS) if m != "full"]
CHUNK_MS = 40


@functools.lru_cache(maxsize=1)
def speech() -> np.ndarray:
    """1.3 s of eSpeak NG speech at 16 kHz, float32."""
    tts = EspeakNG()
    tts.set_voice("en-us", 170, 50, 50)
    audio = tts.speak("streaming speech on a small device", seed=3).astype(np.float32) / 32768
    return resample(audio, tts.sample_rate, 16000)[:20800]


@functools.lru_cache(maxsize=None)
def model(mixer: str, head: str = "linear") -> CTCModel:
    torch.manual_seed(0)
    config = EncoderConfig.tiny(mixer=mixer, left_frames=6, right_frames=2)
    return CTCModel(config, head=head, lstm_hidden=16).float().eval()


@functools.lru_cache(maxsize=None)
def exported(mixer: str, head: str = "linear", int8: bool = False):
    return export_model(model(mixer, head), CHUNK_MS, int8=int8)


def pytorch_stream(m: CTCModel, audio: np.ndarray, chunk: int) -> np.ndarray:
    state = m.init_state(1)
    out = []
    with torch.no_grad():
        for start in range(0, len(audio), chunk):
            piece = torch.from_numpy(audio[start:start + chunk])[None]
            y, state = m.step(piece, state)
            out.append(y[0])
        y, _ = m.flush(state)
    return torch.cat(out + [y[0]]).numpy()


def onnx_stream(m: OnnxModel, audio: np.ndarray, chunk: int) -> np.ndarray:
    state = m.init_state(1)
    out = []
    for start in range(0, len(audio), chunk):
        piece = audio[start:start + chunk][None]
        y, state = m.step(piece, state)
        out.append(np.asarray(y[0]))
    y, _ = m.flush(state)
    return np.concatenate(out + [np.asarray(y[0])])


@pytest.mark.parametrize("mixer", STREAMING)
def test_onnx_runtime_equals_pytorch_from_cold_start_through_flush(mixer):
    data, info = exported(mixer)
    runtime = OnnxModel(data)
    audio = speech()
    chunk = info.chunk_samples
    reference = pytorch_stream(model(mixer), audio, chunk)
    with torch.no_grad():
        offline, frames = model(mixer)(torch.from_numpy(audio)[None])
    assert reference.shape == (int(frames[0]), len(model(mixer).vocab))
    streamed = onnx_stream(runtime, audio, chunk)
    assert streamed.shape == reference.shape
    assert np.abs(streamed - reference).max() < 1e-4
    assert np.abs(streamed - offline[0].numpy()).max() < 1e-4


def mixed_batch_flush(m, audios: list[np.ndarray], chunk: int, flush_calls: int) -> tuple[list[np.ndarray], object]:
    """Two streams in one batch of ``step_window`` calls: a stream whose audio is all in flushes (its row
    padding, its flag set) while the other keeps stepping, then gets more flush calls than it needs."""
    state = m.stack_states([m.init_state(1), m.init_state(1)])
    fed, outputs = [0, 0], [[], []]
    for _ in range(max(-(-len(a) // chunk) for a in audios) + flush_calls + 1):
        pieces = [a[f:f + chunk] for a, f in zip(audios, fed)]
        flush = torch.tensor([len(p) == 0 for p in pieces])
        counts = torch.tensor([len(p) for p in pieces])
        batch = torch.from_numpy(np.stack([np.pad(p, (chunk - len(p), 0)) for p in pieces]))
        with torch.no_grad():
            y, emitted, state = m.step_window(batch, state, counts, flush)
        for b in range(2):
            outputs[b].append(np.asarray(y[b, :int(emitted[b])]))
            fed[b] += len(pieces[b])
    return [np.concatenate(o) for o in outputs], state


@pytest.mark.parametrize("mixer", STREAMING)
def test_a_stream_flushes_inside_a_stepping_batch_eagerly_and_in_onnx_alike(mixer):
    data, info = exported(mixer)
    eager_model, runtime = model(mixer), OnnxModel(data)
    audio = speech()
    audios = [audio, audio[:9000]]
    eager, eager_state = mixed_batch_flush(eager_model, audios, info.chunk_samples, info.flush_calls)
    onnx_out, onnx_state = mixed_batch_flush(runtime, audios, info.chunk_samples, info.flush_calls)
    assert eager_state.encoder.frames_waiting.tolist() == [0, 0]
    waiting = onnx_state.tensors["encoder.frames_in"] - onnx_state.tensors["encoder.frames_out"]
    assert waiting.tolist() == [0, 0]
    for b, piece in enumerate(audios):
        with torch.no_grad():
            offline, frames = eager_model(torch.from_numpy(piece)[None])
        assert eager[b].shape == onnx_out[b].shape == (int(frames[0]), len(eager_model.vocab))
        assert np.abs(eager[b] - offline[0].numpy()).max() < 1e-4
        assert np.abs(onnx_out[b] - eager[b]).max() < 1e-4
    with pytest.raises(ValueError, match="stream 1 was flushed"):
        eager_model.step_window(torch.zeros(2, 640), eager_state, torch.tensor([0, 640]))
    with pytest.raises(ValueError, match=r"flush must be a bool tensor of shape \(2,\), got dtype torch.int64"):
        eager_model.step_window(torch.zeros(2, 640), eager_state, flush=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"flush must be a bool array of shape \(2,\), got dtype int64"):
        runtime.step_window(np.zeros((2, 640), np.float32), onnx_state, flush=np.array([1, 0]))


def test_state_names_come_from_the_state_and_the_graph_is_checked_against_them():
    data, info = exported("llsa", "lstm")
    names = [s["name"] for s in info.states]
    assert names == state_names(model("llsa", "lstm").init_state(1))[0]
    assert names[:2] == ["encoder.frontend", "encoder.positional"]
    assert names[-6:] == ["encoder.samples_in", "encoder.frames_in", "encoder.frames_end", "encoder.frames_out",
                          "lstm.0", "lstm.1"]
    assert "encoder.stack.layers.1.kv_c" in names

    broken = onnx.load_from_string(data)
    next(i for i in broken.graph.input if i.name == "state.encoder.positional").name = "state.encoder.renamed"
    with pytest.raises(ValueError, match="the model: not an ONNX model ONNX Runtime can load .*INVALID_ARGUMENT"):
        OnnxModel(broken.SerializeToString())

    def with_states(states) -> bytes:
        proto = onnx.load_from_string(data)
        entry = next(p for p in proto.metadata_props if p.key == "streamssl")
        entry.value = json.dumps({**json.loads(entry.value), "states": states})
        return proto.SerializeToString()

    renamed = [dict(s, input="state.encoder.renamed") if s["name"] == "encoder.positional" else s
               for s in info.states]
    with pytest.raises(ValueError, match="graph state input 1 is 'state.encoder.positional' where the metadata "
                                         "has 'state.encoder.renamed'"):
        OnnxModel(with_states(renamed))

    misordered = list(info.states)
    misordered[-2], misordered[-1] = misordered[-1], misordered[-2]
    # The graph has no inputs for the empty caches of layers without look-ahead.
    graph_states = [i.name for i in onnx.load_from_string(data).graph.input if i.name.startswith("state.")]
    assert len(graph_states) == len(names) - 2
    with pytest.raises(ValueError, match=f"graph state input {len(names) - 4} is 'state.lstm.0' where the metadata "
                                         "has 'state.lstm.1'"):
        OnnxModel(with_states(misordered))
    resized = [dict(s, shape=["batch", 99, 32]) if s["name"] == "encoder.positional" else s for s in info.states]
    with pytest.raises(ValueError, match=r"'state.encoder.positional' is tensor\(float\) \['batch', 7, 32\] where the metadata "
                                         r"has float32 \['batch', 99, 32\]"):
        OnnxModel(with_states(resized))


def test_lstm_head_and_batched_streams_at_different_positions():
    data, info = exported("llsa", "lstm")
    runtime = OnnxModel(data)
    audio = speech()
    chunk = info.chunk_samples
    reference = pytorch_stream(model("llsa", "lstm"), audio, chunk)
    late = runtime.init_state(1)
    early, _ = runtime.init_state(1), None
    outputs_early, outputs_late = [], []
    for start in range(0, 3 * chunk, chunk):
        y, early = runtime.step(audio[start:start + chunk][None], early)
        outputs_early.append(np.asarray(y[0]))
    # The late stream joins: one call for both from now on.
    state = runtime.stack_states([early, late])
    fed = [3 * chunk, 0]
    while fed[0] < len(audio):
        pieces = [audio[f:f + chunk] for f in fed]
        counts = np.array([len(p) for p in pieces])
        batch = np.stack([np.pad(p, (chunk - len(p), 0)) for p in pieces])
        y, emitted, state = runtime.step_window(batch, state, counts)
        outputs_early.append(y[0, :emitted[0]])
        outputs_late.append(y[1, :emitted[1]])
        fed = [f + chunk for f in fed]
    y, _ = runtime.flush(state.select([0]))
    outputs_early.append(np.asarray(y[0]))
    assert np.abs(np.concatenate(outputs_early) - reference).max() < 1e-4
    assert np.abs(np.concatenate(outputs_late) - reference[:len(np.concatenate(outputs_late))]).max() < 1e-4


def test_metadata_names_every_state_with_shape_dtype_and_initial_value():
    data, info = exported("emformer")
    proto = onnx.load_from_string(data)
    graph_inputs = {i.name for i in proto.graph.input}
    graph_outputs = {o.name for o in proto.graph.output}
    assert {"samples", "samples_count", "flush"} <= graph_inputs
    assert {"log_probs", "emitted"} <= graph_outputs
    assert info.chunk_samples == 640 and info.frames_per_chunk == 2 and info.sample_rate == 16000
    assert info.vocabulary[0] == "<blank>" and info.latency["mixer"] == "emformer"
    assert info.states
    for state in info.states:
        assert state["input"] in graph_inputs and state["output"] in graph_outputs
        assert state["shape"][0] == "batch" and state["initial"] == 0
    fresh = OnnxModel(data).init_state(2)
    assert all(v.shape[0] == 2 and not v.any() for v in fresh.tensors.values())


@pytest.mark.parametrize("frontend", ["conv", "fbank"])
def test_recognizer_onnx_backend_gives_the_pytorch_transcript(frontend):
    if frontend == "conv":
        m = model("llsa")
    else:
        torch.manual_seed(0)
        m = CTCModel(EncoderConfig.tiny(mixer="llsa", frontend="fbank", left_frames=6, right_frames=2)).float().eval()
        m.encoder.frontend.fit_normalizer([(torch.from_numpy(speech())[None], torch.tensor([len(speech())]))])
    audio = torch.from_numpy(speech())
    texts = []
    for backend in ("torch", "onnx"):
        stream = Recognizer(m, chunk_ms=CHUNK_MS, backend=backend).stream()
        stream.accept(audio[:7000])
        stream.accept(audio[7000:])
        transcript = stream.finish()
        texts.append([(t.token_id, t.frame) for t in transcript.tokens])
    assert len(texts[0]) > 3 and texts[0] == texts[1]


def test_int8_export_runs_and_stays_close():
    data, info = exported("sa", "linear", True)
    runtime = OnnxModel(data)
    audio = speech()
    streamed = onnx_stream(runtime, audio, info.chunk_samples)
    reference = pytorch_stream(model("sa"), audio, info.chunk_samples)
    assert streamed.shape == reference.shape
    assert np.abs(np.exp(streamed) - np.exp(reference)).max() < 0.2
    assert "MatMulInteger" in {node.op_type for node in onnx.load_from_string(data).graph.node}


def test_bad_input_is_refused_with_a_reason():
    runtime = OnnxModel(exported("sa")[0])
    other = OnnxModel(exported("llsa")[0])
    state = runtime.init_state(1)
    with pytest.raises(ValueError, match="takes chunks of 640"):
        runtime.step(np.zeros((1, 641), np.float32), state)
    with pytest.raises(ValueError, match="NaN"):
        runtime.step(np.full((1, 640), np.nan, np.float32), state)
    with pytest.raises(ValueError, match="belongs to export"):
        other.step(np.zeros((1, 640), np.float32), state)
    broken = state.select([0])
    name = next(iter(broken.tensors))
    broken.tensors[name] = broken.tensors[name][..., :0]
    with pytest.raises(ValueError, match=f"state tensor '{name}' has shape"):
        runtime.step(np.zeros((1, 640), np.float32), broken)
    with pytest.raises(ValueError, match="not a whole number"):
        export_model(model("sa"), 30)
    with pytest.raises(ValueError, match="left_frames=None"):
        export_model(CTCModel(EncoderConfig.tiny(mixer="sa", left_frames=None)), 40)


def test_frame_input_export_equals_pytorch():
    torch.manual_seed(0)
    m = CTCModel(EncoderConfig.tiny(mixer="emformer", frontend="none", input_dim=12, left_frames=6,
                                    right_frames=2)).float().eval()
    data, info = export_model(m, 40)
    assert info.chunk_samples == 2 and info.inputs[0]["shape"] == ["batch", 2, 12]
    runtime = OnnxModel(data)
    x = torch.randn(1, 31, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        offline, _ = m.encoder(x)
        reference = m.output(offline).log_softmax(-1)[0].numpy()
    streamed = stream_frames(runtime, x, 2).numpy()
    assert streamed.shape == reference.shape
    assert np.abs(streamed - reference).max() < 1e-4


@pytest.mark.parametrize("frontend", ["conv", "fbank"])
def test_cli_exports_a_checkpoint_and_streams_it_with_onnx_runtime(frontend, tmp_path, capsys):
    """The demo's kind of model (fbank + LLSA) too: its graph starts at the log-mel frames, which the
    runtime makes with kaldi-native-fbank, exactly as the PyTorch step does."""
    from streamssl.cli import main
    from streamssl.train.checkpoint import build_model, save_checkpoint
    from streamssl.train.config import preset

    config = preset("finetune", "tiny")
    config.encoder = EncoderConfig.tiny(mixer="llsa", frontend=frontend)
    torch.manual_seed(0)
    m = build_model("finetune", config, config.encoder).eval()
    audio = speech()
    if frontend == "fbank":
        m.encoder.frontend.fit_normalizer([(torch.from_numpy(audio)[None], torch.tensor([audio.size]))])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"kind": "finetune", "encoder_config": config.encoder.to_dict(),
                           "task_config": config.to_dict(), "vocab": m.vocab.symbols,
                           "model": m.state_dict(), "progress": {"step": 0, "epoch": 0, "batch_in_epoch": 0}})
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(path), "--chunk-ms", "40", "--out", str(out)]) == 0
    assert "chunks of 640 samples" in capsys.readouterr().out
    runtime = OnnxModel(out)
    assert [i["name"] for i in runtime.info.inputs][0] == ("features" if frontend == "fbank" else "samples")
    streamed = onnx_stream(runtime, audio, runtime.info.chunk_samples)
    reference = pytorch_stream(m.float(), audio, runtime.info.chunk_samples)
    with torch.no_grad():
        offline, frames = m(torch.from_numpy(audio)[None])
    assert streamed.shape == reference.shape == (int(frames[0]), len(m.vocab))
    assert np.abs(streamed - reference).max() < 1e-4
    assert np.abs(streamed - offline[0, :int(frames[0])].numpy()).max() < 1e-4
    assert main(["export", "--checkpoint", str(path), "--chunk-ms", "30", "--out", str(out)]) == 2
    assert "not a whole number" in capsys.readouterr().err


def test_fbank_export_streams_at_different_positions_and_names_its_features():
    torch.manual_seed(0)
    m = CTCModel(EncoderConfig.tiny(mixer="llsa", frontend="fbank", left_frames=6, right_frames=2)).float().eval()
    audio = speech()
    m.encoder.frontend.fit_normalizer([(torch.from_numpy(audio)[None], torch.tensor([audio.size]))])
    data, info = export_model(m, CHUNK_MS)
    features = info.features
    assert features["kind"] == "fbank" and features["frames_per_chunk"] == 4 and features["pcm_scale"] == 32768
    assert features["knf"]["dither"] == 0 and features["knf"]["window_type"] == "povey"
    assert features["knf"]["snip_edges"] and features["knf"]["num_bins"] == 80
    host = {s["name"]: s for s in info.states if s["input"] is None}
    assert set(host) == set(features["host_states"]) and host["host.frontend.samples"]["shape"] == ["batch", 399]
    # The subsampling context starts as its zero left padding: a count of kernel - 2 = 1, not 0.
    assert {s["initial"] for s in info.states if "context_count" in s["name"]} == {1}
    runtime = OnnxModel(data)
    chunk = info.chunk_samples
    reference = pytorch_stream(m, audio, chunk)
    # Stream 1 starts 300 samples late and is fed pieces of 500: the two never share a frame grid.
    state = runtime.stack_states([runtime.init_state(1), runtime.init_state(1)])
    fed, sizes, outputs = [0, 0], [chunk, 500], [[], []]
    starts = [0, 300]
    while fed[0] < len(audio) or fed[1] < len(audio) - starts[1]:
        pieces = [audio[fed[0]:fed[0] + sizes[0]], audio[starts[1] + fed[1]:starts[1] + fed[1] + sizes[1]]]
        counts = np.array([len(p) for p in pieces])
        batch = np.stack([np.pad(p, (chunk - len(p), 0)) for p in pieces])
        y, emitted, state = runtime.step_window(batch, state, counts)
        for b in range(2):
            outputs[b].append(y[b, :emitted[b]])
            fed[b] += counts[b]
    for b in range(2):
        outputs[b].append(runtime.flush(state.select([b]))[0][0])
    late = pytorch_stream(m, audio[starts[1]:], chunk)
    for streamed, expected in zip(outputs, [reference, late]):
        streamed = np.concatenate(streamed)
        assert streamed.shape == expected.shape
        assert np.abs(streamed - expected).max() < 1e-4
