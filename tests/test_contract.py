"""The streaming contract, written once and run for every registered mixer."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_encoder, stream_in_chunks, stream_joining_batch
from streamssl import MIXERS, Encoder, measure_lookahead

ALL_MIXERS = sorted(MIXERS)


def encoder_or_skip(mixer: str, **overrides):
    """Families whose right context is part of a segment (amtrf, emformer) refuse per-layer lists."""
    try:
        return make_encoder(mixer, **overrides)
    except ValueError as error:
        if isinstance(overrides.get("right_frames"), list):
            pytest.skip(f"{mixer} refuses per-layer right_frames: {error}")
        raise


def streams(encoder) -> bool:
    return encoder.stack.stream_error() is None


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_padding_never_changes_a_valid_output(mixer):
    encoder = make_encoder(mixer, left_frames=4, right_frames=1, n_layers=3)
    torch.manual_seed(1)
    lengths = torch.tensor([9000, 4321, 6400])
    x = torch.randn(3, 9000, dtype=torch.float64)
    x[1, 4321:] = 100.0  # loud garbage in the padding must not leak either
    with torch.no_grad():
        y, y_lengths = encoder(x, lengths)
        for b in range(3):
            alone, alone_lengths = encoder(x[b:b + 1, :lengths[b]])
            assert alone_lengths.item() == y_lengths[b].item()
            assert torch.allclose(y[b, :y_lengths[b]], alone[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streaming_equals_forward_float64(mixer, data):
    left = data.draw(st.one_of(st.none(), st.integers(0, 12)), label="left_frames")
    right = data.draw(st.integers(0, 3), label="right_frames")
    layers = data.draw(st.integers(1, 3), label="n_layers")
    batch = data.draw(st.integers(1, 3), label="batch")
    sizes = data.draw(st.lists(st.integers(1, 2000), min_size=1, max_size=6), label="chunk sizes")
    n_samples = data.draw(st.integers(400, 12000), label="samples")
    encoder = make_encoder(mixer, left_frames=left, right_frames=right, n_layers=layers)
    x = torch.randn(batch, n_samples, dtype=torch.float64, generator=torch.Generator().manual_seed(n_samples))
    if not streams(encoder):
        with pytest.raises(ValueError, match="cannot stream"):
            encoder.init_state(batch)
        return
    with torch.no_grad():
        offline, _ = encoder(x)
    streamed = stream_in_chunks(encoder, x, sizes)
    assert streamed.shape == offline.shape
    assert torch.allclose(streamed, offline, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_streaming_equals_forward_float32_and_frame_input(mixer):
    encoder = make_encoder(mixer, dtype=torch.float32, frontend="none", input_dim=12,
                           left_frames=6, right_frames=2, n_layers=2)
    if not streams(encoder):
        pytest.skip(encoder.stack.stream_error())
    x = torch.randn(2, 157, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        offline, lengths = encoder(x)
    assert lengths.tolist() == [157, 157]
    for sizes in ([1], [7, 1, 30], [157]):
        streamed = stream_in_chunks(encoder, x, sizes)
        assert torch.allclose(streamed, offline, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_one_sample_chunks(mixer):
    encoder = make_encoder(mixer, left_frames=3, right_frames=1, n_layers=2)
    if not streams(encoder):
        pytest.skip(encoder.stack.stream_error())
    x = torch.randn(2, 1500, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        offline, _ = encoder(x)
    assert torch.allclose(stream_in_chunks(encoder, x, [1]), offline, atol=1e-9, rtol=0)


def _state_numel(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_state_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_numel(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_state_numel(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_state_size_is_bounded_by_left_context(mixer):
    encoder = make_encoder(mixer, frontend="none", input_dim=8, left_frames=5, right_frames=2, n_layers=2)
    if not streams(encoder):
        pytest.skip(encoder.stack.stream_error())
    state = encoder.init_state(2)
    sizes = []
    with torch.no_grad():
        for i in range(60):
            _, state = encoder.step(torch.randn(2, 10, 8, dtype=torch.float64), state)
            sizes.append(_state_numel(state))
    assert max(sizes[20:]) == max(sizes[5:20]), "state keeps growing with stream length"


@pytest.mark.parametrize("mixer", ALL_MIXERS)
@pytest.mark.parametrize("left, right, layers", [(4, 0, 1), (6, 2, 3), (None, 1, 2), (3, [0, 3, 1], 3)])
def test_probe_confirms_declared_lookahead(mixer, left, right, layers):
    encoder = encoder_or_skip(mixer, left_frames=left, right_frames=right, n_layers=layers)
    declared = encoder.latency()
    measured = measure_lookahead(encoder)
    assert measured.frontend_lookahead_samples == 80  # 25 ms window, 20 ms hop
    assert measured.dependency_frames == declared.encoder_lookahead_frames
    assert measured.dependency_mean_frames == declared.encoder_mean_lookahead_frames
    if streams(encoder):
        assert measured.emission_frames == declared.encoder_lookahead_frames
        assert measured.emission_mean_frames == declared.encoder_mean_lookahead_frames
    else:
        assert measured.emission_frames is None


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_training_form_has_gradients_everywhere(mixer):
    encoder = make_encoder(mixer, dtype=torch.float32, left_frames=4, right_frames=1).train()
    x = torch.randn(2, 4000)
    y, y_lengths = encoder(x, torch.tensor([4000, 2500]))
    mask = torch.arange(y.shape[1]) < y_lengths[:, None]
    (y * mask[..., None]).pow(2).sum().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradients: {missing}"


@pytest.mark.parametrize("mixer", ALL_MIXERS)
def test_streams_that_start_at_different_times_share_one_batch(mixer):
    """Streams join a running batch, are fed ragged pieces (right-aligned, with counts), and leave when
    they end; each one's outputs equal its own offline output."""
    encoder = make_encoder(mixer, left_frames=4, right_frames=2, n_layers=2)
    if not streams(encoder):
        pytest.skip(encoder.stack.stream_error())
    generator = torch.Generator().manual_seed(7)
    starts, sizes = [0, 2, 5], [9000, 5100, 4000]
    audio = [torch.randn(n, dtype=torch.float64, generator=generator) for n in sizes]
    with torch.no_grad():
        offline = [encoder(a[None])[0][0] for a in audio]
    # pieces of 450 samples: not a multiple of the 320-sample hop, so the streams' frame phases differ
    streamed = stream_joining_batch(encoder, audio, starts, piece=450)
    for i in range(3):
        assert streamed[i].shape == offline[i].shape
        assert torch.allclose(streamed[i], offline[i], atol=1e-9, rtol=0)
