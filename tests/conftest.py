import pytest
import torch
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from streamssl import Encoder, EncoderConfig

torch.set_num_threads(1)

# Every property test draws the same examples on every run (seeded from the test function, for a given
# Hypothesis version), so a failure in CI replays locally; Hypothesis prints the falsifying example and the
# blob for @reproduce_failure. Loaded before the test modules, so their own @settings start from it.
settings.register_profile("reproducible", derandomize=True, database=None, print_blob=True)
settings.load_profile("reproducible")


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


def stream_joining_batch(encoder: Encoder, audio: list[torch.Tensor], starts: list[int], piece: int
                         ) -> list[torch.Tensor]:
    """Stream ``audio[i]`` ((S_i,) or (S_i, F)) through one shared batch: stream ``i`` joins at tick
    ``starts[i]``, every tick each member gets its next ``piece`` samples (the last one shorter, right-aligned,
    with counts), and a stream whose input is all in is flushed and leaves. Returns each stream's outputs."""
    outputs: list[list[torch.Tensor]] = [[] for _ in audio]
    fed, members, state, tick = [0] * len(audio), [], None, 0
    with torch.no_grad():
        while tick <= max(starts) or members:
            for i, start in enumerate(starts):
                if start == tick:
                    fresh = encoder.init_state(1)
                    state = fresh if state is None else Encoder.stack_states([state, fresh])
                    members.append(i)
            tick += 1
            if not members:
                continue
            pieces = [audio[i][fed[i]:fed[i] + piece] for i in members]
            counts = torch.tensor([p.shape[0] for p in pieces])
            chunk = torch.stack([torch.nn.functional.pad(p.movedim(0, -1), (piece - p.shape[0], 0)).movedim(-1, 0)
                                 for p in pieces])
            y, emitted, state = encoder.step_window(chunk, state, counts)
            for row, i in enumerate(members):
                outputs[i].append(y[row, :emitted[row]])
                fed[i] += pieces[row].shape[0]
            staying = [row for row, i in enumerate(members) if fed[i] < audio[i].shape[0]]
            for row, i in enumerate(members):
                if fed[i] >= audio[i].shape[0]:
                    outputs[i].append(encoder.flush(state.select([row]))[0][0])
            members = [members[row] for row in staying]
            state = state.select(staying) if staying else None
    return [torch.cat(parts) for parts in outputs]


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
