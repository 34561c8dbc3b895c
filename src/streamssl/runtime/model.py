"""An exported streaming step run by ONNX Runtime, in numpy: the model behind ``streamssl stream --model``,
``streamssl serve --model`` and ``Recognizer(..., backend="onnx")``, without PyTorch.

The graph (written by :func:`streamssl.export.export_model`, layout in ``docs/streaming.md``) is one step
at a fixed chunk size::

    (samples (B, chunk_samples), samples_count (B,), flush (B,), *state)
        -> (log_probs (B, M, V), emitted (B,), *new_state)

An ``fbank`` model's graph takes the chunk's log-mel frames ``(features, features_count)`` in place of
``samples``; :class:`OnnxModel` makes them with kaldi-native-fbank (:class:`~streamssl.runtime.logmel.LogMel`)
from the settings in the metadata. The metadata (ONNX key ``streamssl``, JSON, :class:`ExportInfo`)
carries everything a recogniser needs besides the graph: vocabulary and word boundary, sample rate,
chunk, frame geometry, log-mel settings, declared latency, and every state's name, shape, dtype and
initial value. Loading checks the file, the metadata's format version and the graph against the
metadata, and says what is wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from streamssl.asr.vocab import CharVocab, SentencePieceVocab, make_vocab
from streamssl.latency import Latency
from streamssl.runtime.logmel import LogMel, knf_options_from

# The version of the metadata an export writes and this runtime reads. 2: word boundary and format
# version recorded (version 1 files carry neither).
FORMAT_VERSION = 2
METADATA_KEY = "streamssl"
STATE_PREFIX = "state."
NEW_STATE_PREFIX = "new_state."
# The fbank frontend's state entries that an export leaves to the runtime (the samples not yet framed),
# and the prefix of their names in the metadata and in an OnnxState.
HOST_STATE_KEYS = ("samples", "samples_count")
HOST_PREFIX = "host.frontend."
# ONNX Runtime's names of the element types a state may have.
_ORT_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "bool": "tensor(bool)"}


class ExportError(ValueError):
    """A file that is no export this runtime can run; the message says why."""


@dataclass
class ExportInfo:
    """What the ONNX metadata says about an exported step (key ``streamssl``, JSON).

    ``chunk_samples`` input units (samples; frames for frame input) a call, ``hop_samples`` per output
    frame, ``window_samples`` complete frame 0; ``flush_calls`` flushing calls drive out the look-ahead;
    ``vocabulary`` the CTC symbols (blank first), ``word_boundary`` the symbol between words;
    ``features`` the log-mel settings of an ``fbank`` model (``knf``: kaldi-native-fbank's options,
    ``pcm_scale``), ``None`` when the graph takes samples or frames.
    """

    format_version: int
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
    word_boundary: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    states: list[dict[str, Any]]
    features: dict[str, Any] | None = None
    # "characters" or "sentencepiece" (exports before subword units: characters); a sentencepiece
    # vocabulary also carries its model (base64), which the lexicon search spells its words with.
    vocabulary_kind: str = "characters"
    vocabulary_model: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ExportInfo":
        """Parse and check the metadata: ``ExportError`` for bad JSON, another format version, or missing
        or unknown fields."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as error:
            raise ExportError(f"its streamssl metadata is not JSON ({error})") from None
        if not isinstance(fields, dict):
            raise ExportError("its streamssl metadata is not a JSON object")
        version = fields.get("format_version", 1)
        if version != FORMAT_VERSION:
            raise ExportError(f"it is an export of format version {version}; this streamssl reads version "
                              f"{FORMAT_VERSION}: export the checkpoint again with `streamssl export`")
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing, unknown = [n for n in required if n not in fields], sorted(set(fields) - set(names))
        if missing or unknown:
            raise ExportError(f"its streamssl metadata lacks {missing} and has unknown fields {unknown}")
        return cls(**fields)


def make_session(data: bytes, threads: int) -> Any:
    """The ONNX Runtime session of one exported step on ``threads`` intra-op threads (CPU).

    Options chosen by measurement (docs/benchmarks.md, 12-layer LLSA, C = 2, one thread): the graph
    optimisation levels ``extended`` and ``all`` and turning the memory pattern or the arena off were within
    5 % of each other; ``basic`` was slower for the int8 graph (it does not fuse ``DynamicQuantizeMatMul``).
    So: every graph optimisation, sequential execution (the step is a chain of small operators, nothing to
    run in parallel), one inter-op thread, and no spinning of idle intra-op threads, which on a shared
    machine would burn the cores other streams and processes need.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def check_graph(session: Any, info: ExportInfo) -> None:
    """Check the session's inputs and outputs against the metadata: the step's inputs and outputs by
    name, and every state in order with its element type and fixed sizes. ``ExportError`` names the
    first mismatch. Host-side states are never in the graph, and the exporter drops the inputs of empty
    caches (a layer without look-ahead reads none)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    for side, values, specs in (("input", inputs, info.inputs), ("output", outputs, info.outputs)):
        names = {v.name for v in values}
        for spec in specs:
            if spec["name"] not in names:
                raise ExportError(f"its graph has no {side} {spec['name']!r}, which the metadata names")
    for side, prefix, values in (("input", STATE_PREFIX, inputs), ("output", NEW_STATE_PREFIX, outputs)):
        graph = [v for v in values if v.name.startswith(prefix)]
        present = {v.name for v in graph}
        expected = [spec for spec in info.states
                    if spec[side] is not None and (spec[side] in present or 0 not in spec["shape"])]
        for i in range(max(len(graph), len(expected))):
            got = graph[i].name if i < len(graph) else None
            want = expected[i][side] if i < len(expected) else None
            if got != want:
                raise ExportError(f"graph state {side} {i} is {got!r} where the metadata has {want!r}")
            spec, value = expected[i], graph[i]
            sizes_differ = len(value.shape) != len(spec["shape"]) or any(
                isinstance(d, int) and isinstance(size, int) and d != size
                for d, size in zip(value.shape, spec["shape"]))
            if value.type != _ORT_TYPES.get(spec["dtype"]) or sizes_differ:
                raise ExportError(f"graph state {side} {got!r} is {value.type} {value.shape} where the metadata "
                                  f"has {spec['dtype']} {spec['shape']}")


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
    """An exported step run by ONNX Runtime, with the streaming API the streaming core steps (numpy in
    and out).

    Args:
        source: ONNX bytes or a path, as written by :func:`streamssl.export.export_model`.
        threads: intra-op threads of the session.

    Raises :class:`ExportError` (a ``ValueError``) for a file that is missing, not ONNX, has no
    streamssl metadata, another format version, or a graph that does not match its metadata.
    """

    def __init__(self, source: bytes | str | Path, threads: int = 1):
        if isinstance(source, bytes):
            what, data = "the model", source
        else:
            what = str(source)
            if not Path(source).is_file():
                raise ExportError(f"{what}: no such file")
            data = Path(source).read_bytes()
        try:
            self.session = make_session(data, threads)
        except Exception as error:  # ONNX Runtime raises its own Fail/InvalidProtobuf for a bad file
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"{what}: not an ONNX model ONNX Runtime can load ({first})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ExportError(f"{what}: an ONNX model without streamssl metadata; export a checkpoint with "
                              "`streamssl export`")
        try:
            self.info = ExportInfo.from_json(meta[METADATA_KEY])
            check_graph(self.session, self.info)
        except ExportError as error:
            raise ExportError(f"{what}: {error}") from None
        # (name, sizes past the batch, dtype) of every state, to check a state at each step cheaply.
        self._state_specs = [(spec["name"], tuple(spec["shape"][1:]), np.dtype(spec["dtype"]))
                             for spec in self.info.states]
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = _vocabulary(self.info, what)
        features = self.info.features
        self._log_mel = None if features is None else LogMel(knf_options_from(features["knf"]),
                                                             features["pcm_scale"])
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
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

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
        for name, sizes, dtype in self._state_specs:
            tensor = state.tensors.get(name)
            if tensor is None:
                raise ValueError(f"state has no tensor {name!r}")
            if tensor.shape[0] != batch or tensor.shape[1:] != sizes or tensor.dtype != dtype:
                raise ValueError(f"state tensor {name!r} has shape {tensor.shape} and dtype {tensor.dtype}; "
                                 f"this export expects {(batch, *sizes)} and {dtype}")

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
        mel, mel_counts, samples, waiting = self._log_mel.step(chunk, counts, samples, waiting)
        tensors = {**state.tensors, HOST_PREFIX + "samples": samples, HOST_PREFIX + "samples_count": waiting}
        inputs = {"features": mel, "features_count": mel_counts, "samples_count": counts, "flush": flush}
        return inputs, OnnxState(state.export_id, tensors)

    @property
    def _sample_dims(self) -> tuple[int, ...]:
        """The chunk's dimensions past batch and time: ``(input_dim,)`` for frame input, else none."""
        return tuple(self.info.inputs[0]["shape"][2:]) if self.takes_frames else ()

    def step_window(self, chunk: np.ndarray, state: OnnxState, counts: np.ndarray | None = None,
                    flush: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, OnnxState]:
        """One exported step: ``chunk`` ``(B, n)`` right-aligned, ``n <= chunk_samples``, ``counts``
        ``(B,)`` real samples; ``flush`` ``(B,)`` bool marks the streams whose call is padding past
        their end (their samples are ignored; ``flush_calls`` such calls finish a stream). Returns
        log-probabilities ``(B, frames_per_chunk, V)`` float32 with row ``b``'s ``emitted[b]`` real
        frames first, ``emitted`` ``(B,)`` int64, and the next state."""
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
        counts = np.full(batch, chunk.shape[1], dtype=np.int64) if counts is None else np.asarray(counts)
        flush = np.zeros(batch, dtype=bool) if flush is None else np.asarray(flush)
        if flush.dtype != bool or flush.shape != (batch,):
            raise ValueError(f"flush must be a bool array of shape ({batch},), got dtype {flush.dtype}, "
                             f"shape {flush.shape}")
        # The graph ignores a flushing stream's samples; the host-side log-mel must not consume them either.
        counts = np.where(flush, 0, counts).astype(np.int64) if flush.any() else counts.astype(np.int64, copy=False)
        pad = self.info.chunk_samples - chunk.shape[1]
        if pad:
            chunk = np.pad(chunk, ((0, 0), (pad, 0)) + ((0, 0),) * (chunk.ndim - 2))
        inputs, state = self._inputs_of(chunk, counts, flush, state)
        return self._run(inputs, state)

    def step(self, chunk: np.ndarray, state: OnnxState) -> tuple[np.ndarray, OnnxState]:
        """One step of full rows: log-probabilities ``(B, m, V)`` of the frames made now."""
        log_probs, emitted, state = self.step_window(chunk, state)
        return log_probs[:, :int(emitted.max())], state

    def flush(self, state: OnnxState) -> tuple[np.ndarray, OnnxState]:
        """End every stream: its remaining frames ``(B, m, V)``, real ones first."""
        log_probs, emitted, state = self.flush_window(state)
        return log_probs[:, :int(emitted.max())], state

    def flush_window(self, state: OnnxState) -> tuple[np.ndarray, np.ndarray, OnnxState]:
        """``flush_calls`` :meth:`step_window` calls with every stream flushing, joined: log-probabilities
        ``(B, m, V)`` with each stream's real frames first, how many ``(B,)``, and the state."""
        self._check_state(state)
        batch = state.batch_size
        padding = np.zeros((batch, self.info.chunk_samples, *self._sample_dims), dtype=np.float32)
        flush, counts = np.ones(batch, dtype=bool), np.zeros(batch, dtype=np.int64)
        rows: list[list[np.ndarray]] = [[] for _ in range(batch)]
        for _ in range(self.info.flush_calls):
            log_probs, emitted, state = self.step_window(padding, state, counts, flush)
            for b in range(batch):
                rows[b].append(log_probs[b, :int(emitted[b])])
        joined = [np.concatenate(r) if r else np.zeros((0, len(self.vocab)), np.float32) for r in rows]
        emitted = np.array([len(r) for r in joined], dtype=np.int64)
        out = np.zeros((batch, int(emitted.max()) if batch else 0, len(self.vocab)), dtype=np.float32)
        for b, r in enumerate(joined):
            out[b, :len(r)] = r
        return out, emitted, state


def _vocabulary(info: ExportInfo, what: str) -> CharVocab | SentencePieceVocab:
    """The export's vocabulary, rebuilt from its kind, symbols and (sentencepiece) model."""
    try:
        model_proto = base64.b64decode(info.vocabulary_model) if info.vocabulary_model is not None else None
        vocab = make_vocab(info.vocabulary_kind, info.vocabulary, model_proto)
    except ValueError as error:
        raise ExportError(f"{what}: {error}") from None
    if info.word_boundary != vocab.word_boundary:
        raise ExportError(f"{what}: its word boundary {info.word_boundary!r} is not the {vocab.kind} vocabulary's "
                          f"{vocab.word_boundary!r}")
    return vocab
