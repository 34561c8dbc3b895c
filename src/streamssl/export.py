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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from streamssl.asr.ctc import CharVocab, CTCModel
from streamssl.frontends.fbank import PCM_SCALE, FbankFrontend, FbankOptions, OnlineLogMel
from streamssl.latency import Latency

STATE_PREFIX = "state."
NEW_STATE_PREFIX = "new_state."
# The fbank frontend's state entries that an export leaves to the runtime (the samples not yet framed),
# and the prefix of their names in the metadata and in an OnnxState.
HOST_STATE_KEYS = ("samples", "samples_count")
HOST_PREFIX = "host.frontend."


def _state_names(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of a state's tensor leaves, in ``tree_flatten`` order."""
    if isinstance(tree, Tensor):
        return [prefix]
    if tree is None:
        return []
    if isinstance(tree, (list, tuple)):
        return [name for i, item in enumerate(tree) for name in _state_names(item, f"{prefix}.{i}")]
    if isinstance(tree, dict):
        return [name for key, item in tree.items() for name in _state_names(item, f"{prefix}.{key}")]
    if dataclasses.is_dataclass(tree):
        names = []
        for field in dataclasses.fields(tree):
            value = getattr(tree, field.name)
            if isinstance(value, (str, bool)):
                continue
            names += _state_names(value, f"{prefix}.{field.name}" if prefix else field.name)
        return names
    raise ValueError(f"unexpected state node {type(tree).__name__}")


class _Step(nn.Module):
    """``CTCModel`` streaming step as a function of tensors, for tracing."""

    def __init__(self, model: CTCModel, spec: Any):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, samples: Tensor, samples_count: Tensor, flush: Tensor, *tensors: Tensor):
        state = tree_unflatten(list(tensors), self.spec)
        y, emitted, encoder = self.model.encoder._advance(samples, samples_count, flush, state.encoder, final=False)
        log_probs, lstm = self.model._head_step(y, emitted, state.lstm)
        new_state = dataclasses.replace(state, encoder=encoder, lstm=lstm)
        return (log_probs, emitted, *tree_flatten(new_state)[0])


class _FeatureStep(_Step):
    """The step of an ``fbank`` model from its log-mel frames: kaldi-native-fbank cannot be traced, so
    the runtime computes them (:class:`~streamssl.frontends.fbank.OnlineLogMel`) and the graph starts
    at the normalisation. ``features`` ``(B, slots, num_mel_bins)``: row ``b``'s last
    ``features_count[b]`` frames are new."""

    def forward(self, features: Tensor, features_count: Tensor, samples_count: Tensor, flush: Tensor,
                *tensors: Tensor):
        state = tree_unflatten(list(tensors), self.spec)
        encoder = self.model.encoder
        feats, new, context = encoder.frontend.encode_window(features, features_count, state.encoder.frontend)
        y, emitted, encoder_state = encoder.advance_features(feats, new, context, samples_count, flush, state.encoder)
        log_probs, lstm = self.model._head_step(y, emitted, state.lstm)
        new_state = dataclasses.replace(state, encoder=encoder_state, lstm=lstm)
        return (log_probs, emitted, *tree_flatten(new_state)[0])


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
    leaves, spec = tree_flatten(state)
    names = _state_names(state)
    if len(names) != len(leaves):
        raise ValueError("internal error: state names do not match the state's tensors")
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
    with torch.no_grad():
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
    """Dynamic int8 quantisation of the weights (onnxruntime.quantization)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(data)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        return target.read_bytes()


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
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
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

    def step_window(self, chunk: Tensor | np.ndarray, state: OnnxState,
                    counts: Tensor | np.ndarray | None = None) -> tuple[Tensor, Tensor, OnnxState]:
        """One exported step: ``chunk`` ``(B, chunk_samples)`` right-aligned, ``counts`` ``(B,)`` real samples."""
        self._check_state(state)
        chunk = np.asarray(chunk, dtype=np.float32)
        expected = self._sample_dims
        if chunk.ndim != 2 + len(expected) or chunk.shape[0] != state.batch_size or chunk.shape[2:] != expected:
            raise ValueError(f"chunk must be (batch={state.batch_size}, samples{''.join(f', {d}' for d in expected)}), "
                             f"got shape {chunk.shape}")
        if chunk.shape[1] > self.info.chunk_samples:
            raise ValueError(f"chunk has {chunk.shape[1]} samples but this export takes chunks of "
                             f"{self.info.chunk_samples} ({self.info.chunk_ms:g} ms)")
        if not np.isfinite(chunk).all():
            raise ValueError("chunk contains NaN or infinite values")
        counts = np.full(chunk.shape[0], chunk.shape[1]) if counts is None else np.asarray(counts)
        pad = self.info.chunk_samples - chunk.shape[1]
        chunk = np.pad(chunk, ((0, 0), (pad, 0)) + ((0, 0),) * (chunk.ndim - 2))
        flush = np.zeros(chunk.shape[0], dtype=bool)
        inputs, state = self._inputs_of(chunk, counts.astype(np.int64), flush, state)
        log_probs, emitted, state = self._run(inputs, state)
        return torch.from_numpy(log_probs), torch.from_numpy(emitted), state

    def step(self, chunk: Tensor | np.ndarray, state: OnnxState) -> tuple[Tensor, OnnxState]:
        log_probs, emitted, state = self.step_window(chunk, state)
        return log_probs[:, :int(emitted.max())], state

    def flush(self, state: OnnxState) -> tuple[Tensor, OnnxState]:
        """``flush_calls`` padding calls; every stream's remaining frames ``(B, m, V)``, real ones first."""
        self._check_state(state)
        batch = state.batch_size
        flush = np.ones(batch, dtype=bool)
        counts = np.zeros(batch, dtype=np.int64)
        if self._log_mel is None:
            inputs = {"samples": np.zeros((batch, *self.info.inputs[0]["shape"][1:]), dtype=np.float32),
                      "samples_count": counts, "flush": flush}
        else:
            inputs = {"features": np.zeros((batch, *self.info.inputs[0]["shape"][1:]), dtype=np.float32),
                      "features_count": counts, "samples_count": counts, "flush": flush}
        rows: list[list[np.ndarray]] = [[] for _ in range(batch)]
        for _ in range(self.info.flush_calls):
            log_probs, emitted, state = self._run(inputs, state)
            for b in range(batch):
                rows[b].append(log_probs[b, :emitted[b]])
        joined = [np.concatenate(r) if r else np.zeros((0, len(self.vocab)), np.float32) for r in rows]
        width = max(len(r) for r in joined)
        out = np.zeros((batch, width, len(self.vocab)), dtype=np.float32)
        for b, r in enumerate(joined):
            out[b, :len(r)] = r
        return torch.from_numpy(out), state
