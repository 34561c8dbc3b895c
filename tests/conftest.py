import pytest
import torch

from streamssl import Encoder, EncoderConfig

torch.set_num_threads(1)


def make_encoder(mixer: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> Encoder:
    """A tiny encoder in eval mode, deterministic from ``seed``."""
    torch.manual_seed(seed)
    return Encoder(EncoderConfig.tiny(mixer=mixer, **overrides)).to(dtype).eval()


@pytest.fixture
def encoder_factory():
    return make_encoder
