"""The streaming step of a fine-tuned CTC model as ONNX, and an ONNX Runtime backend that runs it.

The exported graph is one step at a fixed chunk size (layout in ``docs/streaming.md``)::

    (samples (B, chunk_samples), samples_count (B,), flush (B,), *state)
        -> (log_probs (B, M, V), emitted (B,), *new_state)

``samples`` is right-aligned: its last ``samples_count[b]`` entries are stream ``b``'s audio (a partial
last chunk is padded at the front). ``flush[b]`` true makes the call padding past the end of stream
``b``: ``flush_calls`` such calls drive out its look-ahead. Row ``b`` of ``log_probs`` holds
``emitted[b]`` real frames first. The state tensors are batch-first and of fixed size; all start as
zeros. The ONNX metadata names every input, output and state with its shape, dtype and initial value,
and carries the sample rate, chunk, frame period, declared latency and vocabulary.

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
from streamssl.latency import Latency

STATE_PREFIX = "state."
NEW_STATE_PREFIX = "new_state."


def _state_names(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of a state's tensor leaves, in ``tree_flatten`` order."""
    if isinstance(tree, Tensor):
        return [prefix]
    if tree is None:
        return []
    if isinstance(tree, (list, tuple)):
        return [name for i, item in enumerate(tree) for name in _state_names(item, f"{prefix}.{i}")]
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ExportInfo":
        return cls(**json.loads(text))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_model(model: CTCModel, chunk_ms: float, out: str | Path | None = None,
                 int8: bool = False) -> tuple[bytes, ExportInfo]:
    """Export ``model``'s streaming step at chunks of ``chunk_ms`` to ONNX (float32).

    Returns the ONNX bytes (also written to ``out`` when given) and the metadata. Raises
    ``ValueError`` for a model that cannot stream, has an unlimited left context (its caches would
    grow), or a chunk that is not a whole number of frames. With ``frontend="none"`` the graph's
    ``samples`` are input frames ``(B, chunk_frames, input_dim)``.
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
    if config.frontend == "fbank":
        raise ValueError("the fbank frontend computes features with kaldi-native-fbank outside the graph; "
                         "export of fbank models is not supported yet")
    geometry = encoder.frontend.geometry
    # With frame input a "sample" of the graph is one input frame.
    hop, window = geometry.hop, geometry.receptive_field
    chunk_samples = round(chunk_ms / geometry.unit_ms)
    if encoder.frontend.input_dim is None:
        unit = f"{hop}-sample frames ({geometry.frame_ms:g} ms)"
    else:
        unit = f"{geometry.unit_ms:g} ms input frames"
    if chunk_samples == 0 or chunk_samples % hop or abs(chunk_samples * config.frame_ms / hop - chunk_ms) > 1e-6:
        raise ValueError(f"chunk_ms={chunk_ms} is not a whole number of {unit}")
    frames_per_chunk = chunk_samples // hop
    model = model.float().eval()
    state = model.init_state(1)
    leaves, spec = tree_flatten(state)
    names = _state_names(state)
    if len(names) != len(leaves):
        raise ValueError("internal error: state names do not match the state's tensors")
    for name, leaf in zip(names, leaves):
        if leaf.count_nonzero() != 0:
            raise ValueError(f"internal error: initial state {name} is not all zeros")
    input_dim = encoder.frontend.input_dim
    samples = torch.zeros(1, chunk_samples) if input_dim is None else torch.zeros(1, chunk_samples, input_dim)
    count = torch.full((1,), chunk_samples, dtype=torch.long)
    flush = torch.zeros(1, dtype=torch.bool)
    input_names = ["samples", "samples_count", "flush"] + [STATE_PREFIX + n for n in names]
    output_names = ["log_probs", "emitted"] + [NEW_STATE_PREFIX + n for n in names]
    dynamic = {name: {0: "batch"} for name in input_names + output_names}
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Step(model, spec), (samples, count, flush, *leaves), buffer, dynamo=False,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic,
                          opset_version=17)
        log_probs, _, *_ = _Step(model, spec)(samples, count, flush, *leaves)
    data = buffer.getvalue()
    if int8:
        data = _quantize(data)
    proto = onnx.load_from_string(data)
    states = [{"name": n, "input": STATE_PREFIX + n, "output": NEW_STATE_PREFIX + n,
               "shape": ["batch", *leaf.shape[1:]], "dtype": _dtype_name(leaf.dtype), "initial": 0}
              for n, leaf in zip(names, leaves)]
    pad_frames = encoder.stack.lookahead_frames()
    info = ExportInfo(
        export_id=hashlib.sha256(json.dumps([config.to_dict(), states, chunk_samples, int8]).encode()).hexdigest()[:16],
        sample_rate=config.sample_rate, chunk_samples=chunk_samples, chunk_ms=chunk_ms,
        frame_ms=config.frame_ms, hop_samples=hop, window_samples=window, frames_per_chunk=frames_per_chunk,
        flush_calls=math.ceil(pad_frames / frames_per_chunk),
        latency=model.latency().to_dict(), vocabulary=list(model.vocab.symbols),
        inputs=[{"name": "samples", "shape": ["batch", *samples.shape[1:]], "dtype": "float32"},
                {"name": "samples_count", "shape": ["batch"], "dtype": "int64"},
                {"name": "flush", "shape": ["batch"], "dtype": "bool"}],
        outputs=[{"name": "log_probs", "shape": ["batch", log_probs.shape[1], len(model.vocab)], "dtype": "float32"},
                 {"name": "emitted", "shape": ["batch"], "dtype": "int64"}],
        states=states)
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
        self._latency = Latency(**{k: v for k, v in self.info.latency.items()
                                   if k in {f.name for f in dataclasses.fields(Latency)}})

    # ------------------------------------------------------------ RecognitionModel
    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def takes_frames(self) -> bool:
        return len(self.info.inputs[0]["shape"]) == 3

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
            s["name"]: np.zeros([batch_size, *s["shape"][1:]], dtype=np.dtype(s["dtype"])) for s in self.info.states})

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

    def _run(self, samples: np.ndarray, counts: np.ndarray, flush: np.ndarray,
             state: OnnxState) -> tuple[np.ndarray, np.ndarray, OnnxState]:
        feeds = {"samples": samples, "samples_count": counts, "flush": flush}
        feeds.update({STATE_PREFIX + name: value for name, value in state.tensors.items()
                      if STATE_PREFIX + name in self._inputs})
        results = dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
        # Empty caches (a layer without look-ahead) are not graph inputs: they stay as they are.
        new = {name: results.get(NEW_STATE_PREFIX + name, value) for name, value in state.tensors.items()}
        return results["log_probs"], results["emitted"], OnnxState(state.export_id, new)

    def step_window(self, chunk: Tensor | np.ndarray, state: OnnxState,
                    counts: Tensor | np.ndarray | None = None) -> tuple[Tensor, Tensor, OnnxState]:
        """One exported step: ``chunk`` ``(B, chunk_samples)`` right-aligned, ``counts`` ``(B,)`` real samples."""
        self._check_state(state)
        chunk = np.asarray(chunk, dtype=np.float32)
        expected = tuple(self.info.inputs[0]["shape"][2:])
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
        log_probs, emitted, state = self._run(chunk, counts.astype(np.int64), flush, state)
        return torch.from_numpy(log_probs), torch.from_numpy(emitted), state

    def step(self, chunk: Tensor | np.ndarray, state: OnnxState) -> tuple[Tensor, OnnxState]:
        log_probs, emitted, state = self.step_window(chunk, state)
        return log_probs[:, :int(emitted.max())], state

    def flush(self, state: OnnxState) -> tuple[Tensor, OnnxState]:
        """``flush_calls`` padding calls; every stream's remaining frames ``(B, m, V)``, real ones first."""
        self._check_state(state)
        batch = state.batch_size
        zeros = np.zeros((batch, *self.info.inputs[0]["shape"][1:]), dtype=np.float32)
        counts = np.zeros(batch, dtype=np.int64)
        flush = np.ones(batch, dtype=bool)
        rows: list[list[np.ndarray]] = [[] for _ in range(batch)]
        for _ in range(self.info.flush_calls):
            log_probs, emitted, state = self._run(zeros, counts, flush, state)
            for b in range(batch):
                rows[b].append(log_probs[b, :emitted[b]])
        joined = [np.concatenate(r) if r else np.zeros((0, len(self.vocab)), np.float32) for r in rows]
        width = max(len(r) for r in joined)
        out = np.zeros((batch, width, len(self.vocab)), dtype=np.float32)
        for b, r in enumerate(joined):
            out[b, :len(r)] = r
        return torch.from_numpy(out), state


def cmd_export(args: Any) -> int:
    from streamssl.train.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint, kind="finetune").model
    _, info = export_model(model, args.chunk_ms, args.out, int8=args.int8)
    print(f"wrote {args.out}: chunks of {info.chunk_samples} samples ({info.chunk_ms:g} ms), "
          f"{len(info.states)} state tensors, {info.flush_calls} flush call(s), "
          f"declared look-ahead {info.latency['total_lookahead_ms']} ms")
    return 0


def add_commands(sub: Any) -> None:
    parser = sub.add_parser(
        "export", help="export a fine-tuned checkpoint's streaming step to ONNX",
        description="Export the streaming step (samples, samples_count, flush, *state) -> (log_probs, emitted, "
                    "*new_state) of a fine-tuned CTC checkpoint at a fixed chunk size, with every state's name, "
                    "shape, dtype and initial value in the ONNX metadata (layout: docs/streaming.md).")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint (file or run folder)")
    parser.add_argument("--chunk-ms", type=float, default=40.0, help="audio per step (default 40)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the weights")
    parser.set_defaults(func=cmd_export)
