"""The streaming step of a fine-tuned CTC model as ONNX, and an ONNX Runtime backend that runs it.

The exported graph is one step at a fixed chunk size (layout in ``docs/streaming.md``)::

    (samples (B, chunk_samples), samples_count (B,), flush (B,), *state)
        -> (log_probs (B, M, V), emitted (B,), *new_state)

``samples`` is right-aligned: its last ``samples_count[b]`` entries are stream ``b``'s audio (a partial
last chunk is padded at the front). ``flush[b]`` true makes the call padding past the end of stream
``b``: ``flush_calls`` such calls drive out its look-ahead. Row ``b`` of ``log_probs`` holds
``emitted[b]`` real frames first. An ``fbank`` model's graph takes the chunk's log-mel frames
``(features, features_count)`` in place of ``samples`` (knf cannot be traced), and :class:`OnnxModel`
makes them with :class:`~streamssl.frontends.fbank.OnlineLogMel`. The state tensors are batch-first
and of fixed size. The ONNX metadata names every input, output and state with its shape, dtype and
initial value, and carries the sample rate, chunk, frame period, declared latency and vocabulary.

``streamssl export --checkpoint DIR --chunk-ms 40 --out model.onnx [--int8]``;
:class:`OnnxModel` is what ``Recognizer(..., backend="onnx")`` steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils._pytree import (GetAttrKey, MappingKey, SequenceKey, TreeSpec, tree_flatten,
                                 tree_flatten_with_path, tree_unflatten)

from streamssl.asr.ctc import CharVocab, CTCModel
from streamssl.frontends.fbank import PCM_SCALE, FbankFrontend, FbankOptions, OnlineLogMel
from streamssl.latency import Latency

STATE_PREFIX = "state."
NEW_STATE_PREFIX = "new_state."
# The fbank frontend's state entries that an export leaves to the runtime (the samples not yet framed),
# and the prefix of their names in the metadata and in an OnnxState.
HOST_STATE_KEYS = ("samples", "samples_count")
HOST_PREFIX = "host.frontend."


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
    the runtime computes them (:class:`~streamssl.frontends.fbank.OnlineLogMel`) and the graph starts
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


@dataclass
class ExportInfo:
    """What the ONNX metadata says about an exported step (key ``streamssl``, JSON)."""

    export_id: str
    sample_rate: int
    chunk_samples: int
    chunk_ms: float
    frame_ms: float
    hop_samples: int
    window_samples: int
    frames_per_chunk: int
    flush_calls: int
    latency: dict[str, Any]
    vocabulary: list[str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    states: list[dict[str, Any]]
    features: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ExportInfo":
        return cls(**json.loads(text))


def _knf_settings(log_mel: OnlineLogMel) -> dict[str, Any]:
    """The kaldi-native-fbank options an fbank export's runtime must use, read back from knf itself."""
    opts = log_mel.knf
    frame, mel = opts.frame_opts, opts.mel_opts
    return {"samp_freq": frame.samp_freq, "frame_length_ms": frame.frame_length_ms,
            "frame_shift_ms": frame.frame_shift_ms, "dither": frame.dither, "preemph_coeff": frame.preemph_coeff,
            "remove_dc_offset": frame.remove_dc_offset, "window_type": frame.window_type,
            "round_to_power_of_two": frame.round_to_power_of_two, "snip_edges": frame.snip_edges,
            "num_bins": mel.num_bins, "low_freq": mel.low_freq, "high_freq": mel.high_freq,
            "use_energy": opts.use_energy, "use_log_fbank": opts.use_log_fbank, "use_power": opts.use_power}


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
                    "frames_per_chunk": slots, "knf": _knf_settings(log_mel),
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
        export_id=hashlib.sha256(json.dumps([config.to_dict(), states, chunk_samples, int8]).encode()).hexdigest()[:16],
        sample_rate=config.sample_rate, chunk_samples=chunk_samples, chunk_ms=chunk_ms,
        frame_ms=config.frame_ms, hop_samples=hop, window_samples=hop + geometry.lookahead,
        frames_per_chunk=frames_per_chunk,
        flush_calls=math.ceil(pad_frames / frames_per_chunk),
        latency=model.latency().to_dict(), vocabulary=list(model.vocab.symbols),
        inputs=input_specs,
        outputs=[{"name": "log_probs", "shape": ["batch", log_probs.shape[1], len(model.vocab)], "dtype": "float32"},
                 {"name": "emitted", "shape": ["batch"], "dtype": "int64"}],
        states=states, features=features)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "streamssl", info.to_json()
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


def ort_session_options(threads: int) -> "onnxruntime.SessionOptions":
    """ONNX Runtime session options for a streaming step on ``threads`` intra-op threads.

    Chosen by measurement (docs/benchmarks.md, 12-layer LLSA, C = 2, one thread): the graph optimisation
    levels ``extended`` and ``all`` and turning the memory pattern or the arena off were within 5 % of
    each other, ``basic`` was slower for the int8 graph (it does not fuse ``DynamicQuantizeMatMul``).
    So: every graph optimisation, sequential execution (the step is a chain of small operators, nothing
    to run in parallel), one inter-op thread, and no spinning of idle intra-op threads, which on a shared
    machine would burn the cores other streams and processes need.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass
class OnnxState:
    """A batch of streams' state for one :class:`OnnxModel`: name -> array ``(B, ...)``."""

    export_id: str
    tensors: dict[str, np.ndarray]

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, indices: Sequence[int]) -> "OnnxState":
        index = np.asarray(indices, dtype=np.int64)
        return OnnxState(self.export_id, {k: v[index] for k, v in self.tensors.items()})


class OnnxModel:
    """An exported step run by ONNX Runtime, with the streaming API the recogniser uses.

    Args:
        source: ONNX bytes or a path, as written by :func:`export_model`.
        threads: intra-op threads of the session.
    """

    def __init__(self, source: bytes | str | Path, threads: int = 1):
        import onnx
        import onnxruntime

        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        proto = onnx.load_from_string(data)
        meta = {p.key: p.value for p in proto.metadata_props}
        if "streamssl" not in meta:
            raise ValueError("this ONNX model has no streamssl metadata; export it with `streamssl export`")
        self.info = ExportInfo.from_json(meta["streamssl"])
        check_state_names(proto, self.info.states)
        self.session = onnxruntime.InferenceSession(data, ort_session_options(threads),
                                                    providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = CharVocab(self.info.vocabulary)
        features = self.info.features
        self._log_mel = None if features is None else OnlineLogMel(FbankOptions(**features["options"]),
                                                                    self.info.sample_rate)
        self._latency = Latency(**{k: v for k, v in self.info.latency.items()
                                   if k in {f.name for f in dataclasses.fields(Latency)}})

    # ------------------------------------------------------------ RecognitionModel
    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def takes_frames(self) -> bool:
        return self.info.features is None and len(self.info.inputs[0]["shape"]) == 3

    @property
    def hop_samples(self) -> int | None:
        return None if self.takes_frames else self.info.hop_samples

    @property
    def window_samples(self) -> int | None:
        return None if self.takes_frames else self.info.window_samples

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def eval(self) -> "OnnxModel":
        return self

    def latency(self) -> Latency:
        return self._latency

    def stream_error(self) -> str | None:
        return None

    def init_state(self, batch_size: int) -> OnnxState:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return OnnxState(self.info.export_id, {
            s["name"]: np.full([batch_size, *s["shape"][1:]], s["initial"], dtype=np.dtype(s["dtype"]))
            for s in self.info.states})

    def stack_states(self, states: Sequence[OnnxState]) -> OnnxState:
        for state in states:
            self._check_state(state)
        return OnnxState(self.info.export_id, {
            name: np.concatenate([s.tensors[name] for s in states]) for name in states[0].tensors})

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, OnnxState):
            raise ValueError(f"state must be an OnnxState from this model's init_state, got {type(state).__name__}")
        if state.export_id != self.info.export_id:
            raise ValueError(f"state belongs to export {state.export_id}, this model is export {self.info.export_id}")
        batch = state.batch_size
        for spec in self.info.states:
            tensor = state.tensors.get(spec["name"])
            expected = (batch, *spec["shape"][1:])
            if tensor is None:
                raise ValueError(f"state has no tensor {spec['name']!r}")
            if tensor.shape != expected or tensor.dtype != np.dtype(spec["dtype"]):
                raise ValueError(f"state tensor {spec['name']!r} has shape {tensor.shape} and dtype {tensor.dtype}; "
                                 f"this export expects {expected} and {spec['dtype']}")

    def _run(self, inputs: dict[str, np.ndarray], state: OnnxState) -> tuple[np.ndarray, np.ndarray, OnnxState]:
        feeds = dict(inputs)
        feeds.update({STATE_PREFIX + name: value for name, value in state.tensors.items()
                      if STATE_PREFIX + name in self._inputs})
        results = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        # Host-side states and empty caches (a layer without look-ahead) are no graph inputs: they stay.
        new = {name: results.get(NEW_STATE_PREFIX + name, value) for name, value in state.tensors.items()}
        return results["log_probs"], results["emitted"], OnnxState(state.export_id, new)

    def _inputs_of(self, chunk: np.ndarray, counts: np.ndarray, flush: np.ndarray,
                   state: OnnxState) -> tuple[dict[str, np.ndarray], OnnxState]:
        """The graph inputs of one step of right-aligned ``chunk`` (``(B, chunk_samples[, dim])``); with
        host-side features, the log-mel frames made from it, and the state with the new pending samples."""
        if self._log_mel is None:
            return {"samples": chunk, "samples_count": counts, "flush": flush}, state
        samples, waiting = (state.tensors[HOST_PREFIX + key] for key in HOST_STATE_KEYS)
        mel, mel_counts, samples, waiting = self._log_mel.step(torch.from_numpy(chunk), torch.from_numpy(counts),
                                                               torch.from_numpy(samples), torch.from_numpy(waiting))
        tensors = {**state.tensors, HOST_PREFIX + "samples": samples.numpy(),
                   HOST_PREFIX + "samples_count": waiting.numpy()}
        inputs = {"features": mel.numpy(), "features_count": mel_counts.numpy(), "samples_count": counts,
                  "flush": flush}
        return inputs, OnnxState(state.export_id, tensors)

    @property
    def _sample_dims(self) -> tuple[int, ...]:
        """The chunk's dimensions past batch and time: ``(input_dim,)`` for frame input, else none."""
        return tuple(self.info.inputs[0]["shape"][2:]) if self.takes_frames else ()

    def step_window(self, chunk: Tensor | np.ndarray, state: OnnxState, counts: Tensor | np.ndarray | None = None,
                    flush: Tensor | np.ndarray | None = None) -> tuple[Tensor, Tensor, OnnxState]:
        """One exported step: ``chunk`` ``(B, n)`` right-aligned, ``n <= chunk_samples``, ``counts``
        ``(B,)`` real samples; ``flush`` ``(B,)`` bool marks the streams whose call is padding past
        their end (their samples are ignored; ``flush_calls`` such calls finish a stream)."""
        self._check_state(state)
        chunk = np.asarray(chunk, dtype=np.float32)
        batch = state.batch_size
        expected = self._sample_dims
        if chunk.ndim != 2 + len(expected) or chunk.shape[0] != batch or chunk.shape[2:] != expected:
            raise ValueError(f"chunk must be (batch={batch}, samples{''.join(f', {d}' for d in expected)}), "
                             f"got shape {chunk.shape}")
        if chunk.shape[1] > self.info.chunk_samples:
            raise ValueError(f"chunk has {chunk.shape[1]} samples but this export takes chunks of "
                             f"{self.info.chunk_samples} ({self.info.chunk_ms:g} ms)")
        if not np.isfinite(chunk).all():
            raise ValueError("chunk contains NaN or infinite values")
        counts = np.full(batch, chunk.shape[1]) if counts is None else np.asarray(counts)
        flush = np.zeros(batch, dtype=bool) if flush is None else np.asarray(flush)
        if flush.dtype != bool or flush.shape != (batch,):
            raise ValueError(f"flush must be a bool array of shape ({batch},), got dtype {flush.dtype}, "
                             f"shape {flush.shape}")
        # The graph ignores a flushing stream's samples; the host-side log-mel must not consume them either.
        counts = np.where(flush, 0, counts).astype(np.int64)
        pad = self.info.chunk_samples - chunk.shape[1]
        chunk = np.pad(chunk, ((0, 0), (pad, 0)) + ((0, 0),) * (chunk.ndim - 2))
        inputs, state = self._inputs_of(chunk, counts, flush, state)
        log_probs, emitted, state = self._run(inputs, state)
        return torch.from_numpy(log_probs), torch.from_numpy(emitted), state

    def step(self, chunk: Tensor | np.ndarray, state: OnnxState) -> tuple[Tensor, OnnxState]:
        log_probs, emitted, state = self.step_window(chunk, state)
        return log_probs[:, :int(emitted.max())], state

    def flush(self, state: OnnxState) -> tuple[Tensor, OnnxState]:
        """End every stream: its remaining frames ``(B, m, V)``, real ones first."""
        log_probs, emitted, state = self.flush_window(state)
        return log_probs[:, :int(emitted.max())], state

    def flush_window(self, state: OnnxState) -> tuple[Tensor, Tensor, OnnxState]:
        """``flush_calls`` :meth:`step_window` calls with every stream flushing, joined: log-probabilities
        ``(B, m, V)`` with each stream's real frames first, how many ``(B,)``, and the state."""
        self._check_state(state)
        batch = state.batch_size
        padding = np.zeros((batch, self.info.chunk_samples, *self._sample_dims), dtype=np.float32)
        flush, counts = np.ones(batch, dtype=bool), np.zeros(batch, dtype=np.int64)
        rows: list[list[Tensor]] = [[] for _ in range(batch)]
        for _ in range(self.info.flush_calls):
            log_probs, emitted, state = self.step_window(padding, state, counts, flush)
            for b in range(batch):
                rows[b].append(log_probs[b, :int(emitted[b])])
        joined = [torch.cat(r) if r else torch.zeros(0, len(self.vocab)) for r in rows]
        emitted = torch.tensor([len(r) for r in joined], dtype=torch.long)
        return pad_sequence(joined, batch_first=True), emitted, state
