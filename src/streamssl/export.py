"""The streaming step of a fine-tuned CTC model as ONNX, and an ONNX Runtime backend that runs it.

The exported graph is one step at a fixed chunk size (layout in ``docs/streaming.md``)::

    (samples (B, chunk_samples), samples_count (B,), flush (B,), *state)
        -> (log_probs (B, M, V), emitted (B,), *new_state)

``samples`` is right-aligned: its last ``samples_count[b]`` entries are stream ``b``'s audio (a partial
last chunk is padded at the front). ``flush[b]`` true makes the call padding past the end of stream
``b``: ``flush_calls`` such calls drive out its look-ahead. Row ``b`` of ``log_probs`` holds
``emitted[b]`` real frames first. An ``fbank`` model's graph takes the chunk's log-mel frames
``(features, features_count)`` in place of ``samples`` (knf cannot be traced), and the runtime makes
them with kaldi-native-fbank. The state tensors are batch-first and of fixed size. The ONNX metadata
(:class:`~streamssl.runtime.model.ExportInfo`) names every input, output and state with its shape, dtype
and initial value, and carries what rebuilds the recogniser: sample rate, chunk, frame geometry,
declared latency, vocabulary and word boundary, and the log-mel settings.

``streamssl export --checkpoint DIR --chunk-ms 40 --out model.onnx [--int8]``; the torch-free
:class:`~streamssl.runtime.model.OnnxModel` runs the file (``streamssl stream --model model.onnx``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import (GetAttrKey, MappingKey, SequenceKey, TreeSpec, tree_flatten,
                                 tree_flatten_with_path, tree_unflatten)

from streamssl.asr.ctc import CTCModel
from streamssl.frontends.fbank import FbankFrontend
from streamssl.runtime.logmel import PCM_SCALE, knf_settings
from streamssl.runtime.model import (FORMAT_VERSION, HOST_PREFIX, HOST_STATE_KEYS, METADATA_KEY, NEW_STATE_PREFIX,
                                     STATE_PREFIX, ExportInfo)


def _vocabulary_model(vocab) -> str | None:
    """A sentencepiece vocabulary's serialised model as base64 text (metadata values are strings), so the
    lexicon search can spell its words in pieces beside the export too."""
    proto = getattr(vocab, "model_proto", None)
    return base64.b64encode(proto).decode("ascii") if proto is not None else None


def state_names(state: Any) -> tuple[list[str], list[Tensor], TreeSpec]:
    """The state's tensor leaves in ``tree_flatten`` order, each named by its dotted path in the tree
    (``encoder.stack.blocks.0.mixer.kv``, ``lstm.0``), and the tree's spec."""
    paths, spec = tree_flatten_with_path(state)
    return [".".join(_key_name(key) for key in path) for path, _ in paths], [leaf for _, leaf in paths], spec


def _key_name(key: Any) -> str:
    if isinstance(key, GetAttrKey):
        return key.name
    if isinstance(key, MappingKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    raise ValueError(f"unexpected key {key!r} in a streaming state")


def check_state_names(proto: Any, states: Sequence[dict[str, Any]]) -> None:
    """Check the graph's state inputs and outputs, one by one and in order, against ``states`` (the
    metadata's, named by :func:`state_names`): same name, element type and fixed sizes.

    Raises ``ValueError`` naming the first mismatch. Host-side states (no ``input``) are never in the
    graph, and the exporter drops the inputs of empty caches (a layer without look-ahead reads none).
    """
    from onnx.helper import np_dtype_to_tensor_dtype

    for side, prefix, values in (("input", STATE_PREFIX, proto.graph.input),
                                 ("output", NEW_STATE_PREFIX, proto.graph.output)):
        graph = [v for v in values if v.name.startswith(prefix)]
        present = {v.name for v in graph}
        expected = [spec for spec in states
                    if spec[side] is not None and (spec[side] in present or 0 not in spec["shape"])]
        for i in range(max(len(graph), len(expected))):
            got = graph[i].name if i < len(graph) else None
            want = expected[i][side] if i < len(expected) else None
            if got != want:
                raise ValueError(f"graph state {side} {i} is {got!r} where the state's structure has {want!r}")
            spec, tensor_type = expected[i], graph[i].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            sizes_differ = len(dims) != len(spec["shape"]) or any(
                d is not None and isinstance(size, int) and d != size for d, size in zip(dims, spec["shape"]))
            if tensor_type.elem_type != np_dtype_to_tensor_dtype(np.dtype(spec["dtype"])) or sizes_differ:
                raise ValueError(f"graph state {side} {got!r} has element type {tensor_type.elem_type} and sizes "
                                 f"{dims} where the state's structure has {spec['dtype']} {spec['shape']}")


class _Step(nn.Module):
    """``CTCModel.step_window`` as a function of flat tensors, for tracing."""

    def __init__(self, model: CTCModel, spec: TreeSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, samples: Tensor, samples_count: Tensor, flush: Tensor, *tensors: Tensor):
        state = tree_unflatten(list(tensors), self.spec)
        log_probs, emitted, new_state = self.model.step_window(samples, state, samples_count, flush)
        return (log_probs, emitted, *self._flat(new_state))

    def _flat(self, new_state: Any) -> list[Tensor]:
        """The new state's leaves, which the graph names after the input state's: same tree, same order."""
        leaves, spec = tree_flatten(new_state)
        if spec != self.spec:
            raise ValueError(f"internal error: the step returned a state of another structure: {spec} != {self.spec}")
        return leaves


class _FeatureStep(_Step):
    """The step of an ``fbank`` model from its log-mel frames: kaldi-native-fbank cannot be traced, so
    the runtime computes them (:class:`~streamssl.runtime.logmel.LogMel`) and the graph starts
    at the normalisation (``FbankFrontend.encode_window``, then ``CTCModel.advance_features``).
    ``features`` ``(B, slots, num_mel_bins)``: row ``b``'s last ``features_count[b]`` frames are new."""

    def forward(self, features: Tensor, features_count: Tensor, samples_count: Tensor, flush: Tensor,
                *tensors: Tensor):
        state = tree_unflatten(list(tensors), self.spec)
        # A flushing stream's input is ignored, as CTCModel.step_window ignores its samples.
        features_count = torch.where(flush, 0, features_count)
        frontend = self.model.encoder.frontend
        feats, new, context = frontend.encode_window(features, features_count, state.encoder.frontend)
        log_probs, emitted, new_state = self.model.advance_features(feats, new, context, samples_count, state, flush)
        return (log_probs, emitted, *self._flat(new_state))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_model(model: CTCModel, chunk_ms: float, out: str | Path | None = None,
                 int8: bool = False) -> tuple[bytes, ExportInfo]:
    """Export ``model``'s streaming step at chunks of ``chunk_ms`` to ONNX (float32).

    Returns the ONNX bytes (also written to ``out`` when given) and the metadata. Raises
    ``ValueError`` for a model that cannot stream, has an unlimited left context (its caches would
    grow), or a chunk that is not a whole number of frames. With ``frontend="none"`` the graph's
    ``samples`` are input frames ``(B, chunk_frames, input_dim)``; with ``fbank`` the graph takes the
    chunk's kaldi-native-fbank log-mel frames (``features``), which the runtime makes, and the metadata's
    ``features`` entry says how (layout in ``docs/streaming.md``).
    """
    import onnx

    error = model.stream_error()
    if error is not None:
        raise ValueError(error)
    encoder = model.encoder
    config = encoder.config
    if config.left_frames is None:
        raise ValueError("left_frames=None keeps every past frame, so the state grows with the stream and "
                         "cannot have a fixed shape; export a model with a finite left_frames")
    if not chunk_ms or chunk_ms <= 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
    frontend = encoder.frontend
    geometry = frontend.geometry
    # With frame input a "sample" of the graph is one input frame.
    hop = geometry.hop
    chunk_samples = round(chunk_ms / geometry.unit_ms)
    if frontend.input_dim is None:
        unit = f"{hop}-sample frames ({geometry.frame_ms:g} ms)"
    else:
        unit = f"{geometry.unit_ms:g} ms input frames"
    if chunk_samples == 0 or chunk_samples % hop or abs(chunk_samples * config.frame_ms / hop - chunk_ms) > 1e-6:
        raise ValueError(f"chunk_ms={chunk_ms} is not a whole number of {unit}")
    frames_per_chunk = chunk_samples // hop
    model = model.float().eval()
    state = model.init_state(1)
    host_features = isinstance(frontend, FbankFrontend)
    host: dict[str, Tensor] = {}
    if host_features:
        # The pending samples stay with the runtime, which makes the log-mel frames from them.
        host = {key: state.encoder.frontend[key] for key in HOST_STATE_KEYS}
        graph_frontend = {k: v for k, v in state.encoder.frontend.items() if k not in HOST_STATE_KEYS}
        state = dataclasses.replace(state, encoder=dataclasses.replace(state.encoder, frontend=graph_frontend))
    names, leaves, spec = state_names(state)
    initial = {}
    for name, leaf in zip(list(names) + [HOST_PREFIX + k for k in host], leaves + list(host.values())):
        values = leaf.flatten().unique()
        if values.numel() > 1:
            raise ValueError(f"internal error: initial state {name} is not one constant")
        initial[name] = values.item() if values.numel() else 0
    count = torch.full((1,), chunk_samples, dtype=torch.long)
    flush = torch.zeros(1, dtype=torch.bool)
    state_inputs = [STATE_PREFIX + n for n in names]
    output_names = ["log_probs", "emitted"] + [NEW_STATE_PREFIX + n for n in names]
    features = None
    if host_features:
        log_mel = frontend.log_mel
        slots = log_mel.slots(chunk_samples)
        mel = torch.zeros(1, slots, frontend.options.num_mel_bins)
        args: tuple[Tensor, ...] = (mel, torch.full((1,), slots, dtype=torch.long), count, flush)
        step: nn.Module = _FeatureStep(model, spec)
        input_specs = [{"name": "features", "shape": ["batch", slots, mel.shape[2]], "dtype": "float32"},
                       {"name": "features_count", "shape": ["batch"], "dtype": "int64"},
                       {"name": "samples_count", "shape": ["batch"], "dtype": "int64"},
                       {"name": "flush", "shape": ["batch"], "dtype": "bool"}]
        features = {"kind": "fbank", "options": dataclasses.asdict(frontend.options), "pcm_scale": PCM_SCALE,
                    "frames_per_chunk": slots, "knf": knf_settings(log_mel.knf),
                    "host_states": [HOST_PREFIX + k for k in host]}
    else:
        input_dim = frontend.input_dim
        samples = torch.zeros(1, chunk_samples) if input_dim is None else torch.zeros(1, chunk_samples, input_dim)
        args = (samples, count, flush)
        step = _Step(model, spec)
        input_specs = [{"name": "samples", "shape": ["batch", *samples.shape[1:]], "dtype": "float32"},
                       {"name": "samples_count", "shape": ["batch"], "dtype": "int64"},
                       {"name": "flush", "shape": ["batch"], "dtype": "bool"}]
    input_names = [spec_["name"] for spec_ in input_specs] + state_inputs
    dynamic = {name: {0: "batch"} for name in input_names + output_names}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The step reads its fixed sizes as Python ints on purpose (mixers.window.size); the tracer warns
        # about each one.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(step, (*args, *leaves), buffer, dynamo=False,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic,
                          opset_version=17)
        log_probs, _, *_ = step(*args, *leaves)
    data = buffer.getvalue()
    if int8:
        data = _quantize(data)
    proto = onnx.load_from_string(data)
    states = [{"name": n, "input": STATE_PREFIX + n, "output": NEW_STATE_PREFIX + n,
               "shape": ["batch", *leaf.shape[1:]], "dtype": _dtype_name(leaf.dtype), "initial": initial[n]}
              for n, leaf in zip(names, leaves)]
    states += [{"name": HOST_PREFIX + k, "input": None, "output": None, "shape": ["batch", *leaf.shape[1:]],
                "dtype": _dtype_name(leaf.dtype), "initial": initial[HOST_PREFIX + k]} for k, leaf in host.items()]
    check_state_names(proto, states)
    pad_frames = encoder.stack.lookahead_frames()
    info = ExportInfo(
        format_version=FORMAT_VERSION, export_id=hashlib.sha256(json.dumps([config.to_dict(), states, chunk_samples, int8]).encode()).hexdigest()[:16],
        sample_rate=config.sample_rate, chunk_samples=chunk_samples, chunk_ms=chunk_ms,
        frame_ms=config.frame_ms, hop_samples=hop, window_samples=hop + geometry.lookahead,
        frames_per_chunk=frames_per_chunk,
        flush_calls=math.ceil(pad_frames / frames_per_chunk),
        latency=model.latency().to_dict(), vocabulary=list(model.vocab.symbols),
        word_boundary=model.vocab.word_boundary, vocabulary_kind=model.vocab.kind,
        vocabulary_model=_vocabulary_model(model.vocab),
        inputs=input_specs,
        outputs=[{"name": "log_probs", "shape": ["batch", log_probs.shape[1], len(model.vocab)], "dtype": "float32"},
                 {"name": "emitted", "shape": ["batch"], "dtype": "int64"}],
        states=states, features=features)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()
    data = proto.SerializeToString()
    if out is not None:
        Path(out).write_bytes(data)
    return data, info


def _quantize(data: bytes) -> bytes:
    """Dynamic int8 quantisation of the weight matrix products (onnxruntime.quantization): int8 weights,
    per tensor, activations quantised at run time. Only products with a constant weight are quantised:
    attention's products of two activations stay in float32, where quantising both sides at every step
    costs more than it saves. Chosen by measurement (docs/benchmarks.md): per-channel weights and uint8
    weights were slower on this CPU, and the same file runs everywhere (VNNI where the CPU has it)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(data)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        return target.read_bytes()
