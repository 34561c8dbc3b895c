import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from streamssl import Encoder, EncoderConfig

torch.set_num_threads(1)


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
