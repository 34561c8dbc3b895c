import numpy as np
import pytest
import torch
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from train_corpus import make_corpus

from streamssl import Encoder, EncoderConfig
from streamssl.streaming.engine import StreamingEngine

torch.set_num_threads(1)

# Every property test draws the same examples on every run (seeded from the test function, for a given
# Hypothesis version), so a failure in CI replays locally; Hypothesis prints the falsifying example and the
# blob for @reproduce_failure. Loaded before the test modules, so their own @settings start from it.
settings.register_profile("reproducible", derandomize=True, database=None, print_blob=True)
settings.load_profile("reproducible")


@pytest.fixture(scope="session")
def tone_checkpoint(tmp_path_factory):
    """A tiny CTC model trained on the tone corpus: it spells tones and gives blanks in silence (shared by
    the server tests, so it is trained once per session)."""
    from streamssl.cli import main

    folder = tmp_path_factory.mktemp("tone-model")
    manifest = make_corpus(folder / "corpus", n=40, words=(2, 3))
    code = main(["finetune", "--preset", "tiny", "--train", str(manifest), "--out", str(folder / "ft"),
                 "--steps", "300", "--lr", "0.003", "--set", "max_batch_seconds=8", "--no-progress"])
    assert code == 0
    return folder / "ft"


def make_encoder(mixer: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> Encoder:
    """A tiny encoder in eval mode, deterministic from ``seed``."""
    torch.manual_seed(seed)
    return Encoder(EncoderConfig.tiny(mixer=mixer, **overrides)).to(dtype).eval()


@pytest.fixture
def encoder_factory():
    return make_encoder


def stream_in_chunks(encoder: Encoder, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed ``x`` (B, S[, F]) in chunks of ``sizes`` (cycled), flush, and join the outputs along time."""
    state = encoder.init_state(x.shape[0])
    outputs, pos, i = [], 0, 0
    with torch.no_grad():
        while pos < x.shape[1]:
            n = sizes[i % len(sizes)]
            y, state = encoder.step(x[:, pos:pos + n], state)
            outputs.append(y)
            pos, i = pos + n, i + 1
        y, _ = encoder.flush(state)
    return torch.cat(outputs + [y], dim=1)


class FrameCollector:
    """A stream decoder of the streaming core that keeps the raw output frames instead of decoding them
    (the core hands decoders numpy arrays); :attr:`output` joins them as a tensor."""

    def __init__(self):
        self.frames: list[np.ndarray] = []

    def push(self, outputs: np.ndarray) -> list:
        self.frames.append(outputs.copy())
        return []

    @property
    def output(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(self.frames))

    def finish(self) -> list:
        return []

    def text(self) -> str:
        return ""


def stream_joining_batch(encoder: Encoder, audio: list[torch.Tensor], starts: list[int], piece: int
                         ) -> list[torch.Tensor]:
    """Stream ``audio[i]`` ((S_i,) or (S_i, F)) through the streaming core, one shared batch: stream ``i``
    joins at tick ``starts[i]``, every tick each member gets its next ``piece`` samples (the last one
    shorter, right-aligned, with counts), and a stream whose input is all in is flushed and leaves.
    Returns each stream's outputs."""
    engine = StreamingEngine(encoder, decoder=FrameCollector)
    streams: dict[int, tuple] = {}
    fed, tick = [0] * len(audio), 0
    streams_done: dict[int, torch.Tensor] = {}
    while tick <= max(starts) or streams:
        for i, start in enumerate(starts):
            if start == tick:
                streams[i] = engine.stream()
        tick += 1
        if not streams:
            continue
        engine.accept({stream: audio[i][fed[i]:fed[i] + piece] for i, stream in streams.items()})
        for i in streams:
            fed[i] += piece
        ending = [i for i in streams if fed[i] >= audio[i].shape[0]]
        if ending:
            engine.finish([streams[i] for i in ending])
        for i in ending:
            streams_done[i] = streams.pop(i).decoder.output
    return [streams_done[i] for i in range(len(audio))]


def stream_frames(model, x: torch.Tensor, piece: int) -> torch.Tensor:
    """Stream one input ``x`` ``(1, S[, F])`` through the streaming core in pieces of ``piece``, flush, and
    return every output frame in order: the model's outputs, undecoded. An ONNX export steps at most its
    own chunk per call."""
    info = getattr(model, "info", None)
    engine = StreamingEngine(model, decoder=FrameCollector, max_tick_samples=getattr(info, "chunk_samples", None))
    stream = engine.stream()
    for start in range(0, x.shape[1], piece):
        stream.accept(x[0, start:start + piece])
    stream.finish()
    return stream.decoder.output


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out
