"""The frontend contract, written once and run for every registered frontend x every mixer family."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_encoder, stream_joining_batch
from streamssl import MIXERS, Encoder, EncoderConfig, measure_lookahead
from streamssl.frontends import FRONTENDS

ALL_FRONTENDS = sorted(FRONTENDS)
ALL_MIXERS = sorted(MIXERS)
THREE_SECONDS = 48000


def inputs(encoder, batch: int, n: int) -> torch.Tensor:
    dim = encoder.frontend.input_dim
    shape = (batch, n) if dim is None else (batch, n, dim)
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(n))


def stream(encoder, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed ``x`` in chunks of ``sizes`` (in order; whatever is left goes in one last chunk), flush, join."""
    state = encoder.init_state(x.shape[0])
    outputs, pos = [], 0
    with torch.no_grad():
        for n in sizes + [x.shape[1]]:
            if pos >= x.shape[1]:
                break
            y, state = encoder.step(x[:, pos:pos + n], state)
            outputs.append(y)
            pos += n
        y, _ = encoder.flush(state)
    return torch.cat(outputs + [y], dim=1)


@pytest.mark.parametrize("mixer", ALL_MIXERS)
@pytest.mark.parametrize("frontend", ALL_FRONTENDS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streaming_equals_offline_for_any_chunking(frontend, mixer, data):
    subsampling = data.draw(st.sampled_from([2, 4]), label="fbank subsampling") if frontend == "fbank" else None
    options = {"subsampling": subsampling} if subsampling else {}
    encoder = make_encoder(mixer, frontend=frontend, frontend_options=options, left_frames=4,
                           right_frames=data.draw(st.integers(0, 2), label="right_frames"))
    geometry = encoder.frontend.geometry
    # Chunks from one input unit to 3 s (in input frames with frontend "none").
    longest = max(1, round(3000 / geometry.unit_ms))
    sizes = data.draw(st.lists(st.one_of(st.integers(1, 40), st.integers(1, longest)), min_size=1, max_size=8),
                      label="chunk sizes")
    n = data.draw(st.integers(geometry.min_input, geometry.min_input + longest), label="input units")
    batch = data.draw(st.integers(1, 2), label="batch")
    x = inputs(encoder, batch, n)
    if encoder.stack.stream_error() is not None:
        with pytest.raises(ValueError, match="cannot stream"):
            encoder.init_state(batch)
        return
    with torch.no_grad():
        offline, lengths = encoder(x)
    assert lengths.tolist() == [int(encoder.frontend.output_lengths(torch.tensor(n)))] * batch
    streamed = stream(encoder, x, sizes)
    assert streamed.shape == offline.shape
    assert torch.allclose(streamed, offline, atol=1e-9, rtol=0)


# (frontend, options, frontend look-ahead in ms, frame period in ms): every frontend at its default,
# against every mixer; fbank's other subsampling against one mixer (the probe is slow on knf features).
GEOMETRIES = [("conv", {}, 5.0, 20.0), ("fbank", {}, 15.0, 40.0), ("none", {}, 0.0, 20.0)]
CASES = [(*g, mixer) for g in GEOMETRIES for mixer in ALL_MIXERS] + [("fbank", {"subsampling": 2}, 15.0, 20.0, "llsa")]


def test_geometries_cover_every_frontend():
    assert sorted({g[0] for g in GEOMETRIES}) == ALL_FRONTENDS


@pytest.mark.parametrize("frontend, options, lookahead_ms, frame_ms, mixer", CASES)
def test_declared_latency_counts_the_frontend_and_the_probe_agrees(frontend, options, lookahead_ms, frame_ms,
                                                                   mixer):
    encoder = make_encoder(mixer, frontend=frontend, frontend_options=options, left_frames=4, right_frames=1)
    declared = encoder.latency()
    assert declared.frame_ms == frame_ms
    assert declared.frontend_lookahead_ms == lookahead_ms
    if declared.encoder_lookahead_frames is not None:
        assert declared.total_lookahead_ms == lookahead_ms + declared.encoder_lookahead_frames * frame_ms
    measured = measure_lookahead(encoder)
    geometry = encoder.frontend.geometry
    assert measured.frontend_lookahead_samples * geometry.unit_ms == pytest.approx(lookahead_ms)
    assert measured.dependency_frames == declared.encoder_lookahead_frames
    if encoder.stack.stream_error() is None:
        assert measured.emission_frames == declared.encoder_lookahead_frames


@pytest.mark.parametrize("frontend", ALL_FRONTENDS)
def test_padding_never_changes_a_valid_output(frontend):
    encoder = make_encoder("llsa", frontend=frontend, left_frames=4, right_frames=1)
    geometry = encoder.frontend.geometry
    n = geometry.frame_end(20)
    lengths = torch.tensor([n, geometry.frame_end(7) + 3, geometry.min_input])
    x = inputs(encoder, 3, n)
    x[1, int(lengths[1]):] = 100.0  # loud garbage in the padding must not leak either
    with torch.no_grad():
        y, y_lengths = encoder(x, lengths)
        for b in range(3):
            alone, alone_lengths = encoder(x[b:b + 1, :lengths[b]])
            assert alone_lengths.item() == y_lengths[b].item() > 0
            assert torch.allclose(y[b, :y_lengths[b]], alone[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("frontend", ALL_FRONTENDS)
def test_streams_at_different_positions_share_one_batch(frontend):
    """Streams join a running batch and leave it, fed ragged right-aligned pieces that fall on no frame
    grid; each one's outputs equal its own offline output (the fixed-shape frontend state)."""
    encoder = make_encoder("llsa", frontend=frontend, left_frames=4, right_frames=1)
    geometry = encoder.frontend.geometry
    piece = max(1, round(geometry.hop * 0.7) + 3)
    sizes = [geometry.frame_end(30) + 11, geometry.frame_end(17) + 5, geometry.frame_end(9)]
    starts = [0, 3, 4]
    audio = [inputs(encoder, 1, n)[0] for n in sizes]
    with torch.no_grad():
        offline = [encoder(a[None])[0][0] for a in audio]
    streamed = stream_joining_batch(encoder, audio, starts, piece)
    for i in range(3):
        assert streamed[i].shape == offline[i].shape
        assert torch.allclose(streamed[i], offline[i], atol=1e-9, rtol=0)


@pytest.mark.parametrize("frontend", ALL_FRONTENDS)
def test_training_form_has_gradients_everywhere(frontend):
    encoder = make_encoder("llsa", dtype=torch.float32, frontend=frontend, left_frames=4, right_frames=1).train()
    geometry = encoder.frontend.geometry
    x = inputs(encoder, 2, geometry.frame_end(30)).float()
    y, y_lengths = encoder(x, torch.tensor([x.shape[1], geometry.frame_end(12)]))
    assert y_lengths.tolist() == [31, 13]
    mask = torch.arange(y.shape[1]) < y_lengths[:, None]
    (y * mask[..., None]).pow(2).sum().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradients: {missing}"


@pytest.mark.parametrize("frontend", ALL_FRONTENDS)
def test_config_round_trips_and_rebuilds_the_same_model(frontend, tmp_path):
    config = EncoderConfig.tiny(frontend=frontend, mixer="sa")
    config.save(tmp_path / "encoder.yaml")
    loaded = EncoderConfig.load(tmp_path / "encoder.yaml")
    assert loaded == config
    torch.manual_seed(0)
    a = make_encoder("sa", frontend=frontend)
    b = make_encoder("sa", frontend=frontend)
    b.load_state_dict(a.state_dict())
    x = inputs(a, 1, a.frontend.geometry.frame_end(9))
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])


def test_configs_saved_before_frontend_options_still_load():
    old_conv = {"frontend": "conv", "conv_channels": 24, "conv_kernels": [10, 3], "conv_strides": [5, 2],
                "input_dim": 80, "input_frame_ms": 20.0, "d_model": 32, "n_heads": 4, "pos_conv_groups": 4}
    config = EncoderConfig.from_dict(old_conv)
    assert config.frontend_options == {"channels": 24, "kernels": [10, 3], "strides": [5, 2]}
    assert config.frame_ms == 0.625  # a hop of 5 x 2 samples at 16 kHz
    old_frames = {"frontend": "none", "conv_channels": 512, "input_dim": 12, "input_frame_ms": 10.0}
    assert EncoderConfig.from_dict(old_frames).frontend_options == {"input_dim": 12, "frame_ms": 10.0}
    with pytest.raises(ValueError, match="conv_channels=24 contradicts frontend_options.channels=16"):
        EncoderConfig.from_dict({"conv_channels": 24, "frontend_options": {"channels": 16}})


@pytest.mark.parametrize("options, match", [
    ({"channels": 0}, "frontend_options.channels"),
    ({"kernels": [10, 3], "strides": [5]}, "frontend_options.kernels"),
    ({"strides": [0, 2, 2, 2, 2, 2, 2]}, "frontend_options.strides"),
    ({"width": 3}, r"unknown EncoderConfig.frontend_options for 'conv': \['width'\]"),
])
def test_impossible_conv_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig.tiny(frontend_options=options)


def test_impossible_frame_options_are_refused():
    with pytest.raises(ValueError, match="frontend_options.input_dim"):
        EncoderConfig.tiny(frontend="none", frontend_options={"input_dim": 0})
    with pytest.raises(ValueError, match="frontend_options.frame_ms"):
        EncoderConfig.tiny(frontend="none", frontend_options={"frame_ms": -1.0})
