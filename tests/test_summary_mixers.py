"""Family-specific tests of SummaryMixing (``summary``) and Windowed SummaryMixing (``wsm``)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import LargestOutput, stream_in_chunks
from streamssl import Encoder, EncoderConfig, measure_lookahead
from streamssl.mixers import summary as summary_module
from streamssl.mixers.summary import DEFAULT_WINDOW_LEFT_FRAMES, SummaryMixer
from streamssl.mixers.window import Chunk

INPUT_DIM = 6


def make_encoder(mixer: str, left: int | None, right, n_layers: int = 2, dtype: torch.dtype = torch.float64,
                 seed: int = 0, **options) -> Encoder:
    torch.manual_seed(seed)
    config = EncoderConfig.tiny(frontend="none", input_dim=INPUT_DIM, mixer=mixer, n_layers=n_layers,
                                left_frames=left, right_frames=right, mixer_options=options)
    return Encoder(config).to(dtype).eval()


def reference_mixer(mixer: SummaryMixer, u: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """docs/methods.md section 4 written frame by frame with explicit slices: the definition, slowly."""
    out = torch.zeros_like(u)
    for b, length in enumerate(lengths.tolist()):
        x = u[b, :length]
        for t in range(length):
            parts = [mixer.f(x[t])]
            for w_left, w_right in mixer.windows:
                parts.append(mixer.s_local(x[max(0, t - w_left):t + w_right + 1]).mean(0))
            if mixer.summary == "global":
                seen = x
            elif mixer.left_frames is None:
                seen = x[:t + 1]
            else:
                seen = x[max(0, t - mixer.left_frames):t + 1]
            parts.append(mixer.s(seen).mean(0))
            out[b, t] = mixer.combine(torch.cat(parts))
    return out


@pytest.mark.parametrize("summary", ["causal", "global"])
@pytest.mark.parametrize("left", [None, 3])
@pytest.mark.parametrize("windows", [[], [(2, 1), (0, 3)]])
def test_matches_the_definition_on_a_padded_batch(summary, left, windows):
    torch.manual_seed(0)
    mixer = SummaryMixer("wsm" if windows else "summary", 8, summary, left, windows, 5, 4, 3).double()
    lengths = torch.tensor([11, 4, 7])
    u = torch.randn(3, 11, 8, dtype=torch.float64)
    u[1, 4:] = 1e6  # padding with huge values: any leak would show
    got = mixer(u, lengths)
    want = reference_mixer(mixer, u, lengths)
    for b, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b, :length], want[b, :length], rtol=0, atol=1e-12)


CONFIGS = [
    ("summary", 4, 2, {}),
    ("summary", None, 0, {"summary": "global"}),
    ("summary", None, 1, {}),
    ("wsm", 5, [2, 1], {}),
    ("wsm", None, 2, {"windows": [[3, 1], [0, None]], "window_dim": 8}),
    ("wsm", 3, [0, 3], {"summary": "global", "windows": [[1, 2]]}),
]


@pytest.mark.parametrize("mixer,left,right,options", CONFIGS)
def test_padded_batch_equals_each_utterance_alone(mixer, left, right, options):
    encoder = make_encoder(mixer, left, right, **options)
    lengths = torch.tensor([23, 9, 16])
    x = torch.randn(3, 23, INPUT_DIM, dtype=torch.float64)
    for b, length in enumerate(lengths.tolist()):
        x[b, length:] = 1e3 * torch.randn(23 - length, INPUT_DIM, dtype=torch.float64)
    y, _ = encoder(x, lengths)
    for b, length in enumerate(lengths.tolist()):
        alone, _ = encoder(x[b:b + 1, :length])
        torch.testing.assert_close(y[b:b + 1, :length], alone, rtol=0, atol=1e-10)
        if encoder.stack.stream_error() is None:
            torch.testing.assert_close(stream_in_chunks(encoder, x[b:b + 1, :length], [3, 1, 5]), alone, rtol=0, atol=1e-10)


window_side = st.one_of(st.none(), st.integers(0, 4))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data(), mixer=st.sampled_from(["summary", "wsm"]), left=st.one_of(st.none(), st.integers(0, 6)),
       n_layers=st.integers(1, 3), batch=st.integers(1, 3), frames=st.integers(1, 40),
       chunks=st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_streaming_equals_offline_for_any_chunking(data, mixer, left, n_layers, batch, frames, chunks):
    right = data.draw(st.lists(st.integers(0, 3), min_size=n_layers, max_size=n_layers))
    options = {}
    if mixer == "wsm":
        options["windows"] = data.draw(st.lists(st.tuples(window_side, window_side), min_size=1, max_size=2))
    encoder = make_encoder(mixer, left, right, n_layers=n_layers, **options)
    x = torch.randn(batch, frames, INPUT_DIM, dtype=torch.float64)
    y, _ = encoder(x)
    torch.testing.assert_close(stream_in_chunks(encoder, x, chunks), y, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mixer,options", [("summary", {}), ("wsm", {"windows": [[4, 2], [1, 0]]})])
def test_streaming_equals_offline_in_float32(mixer, options):
    encoder = make_encoder(mixer, 6, [1, 3], dtype=torch.float32, **options)
    x = torch.randn(2, 90, INPUT_DIM)
    y, _ = encoder(x)
    torch.testing.assert_close(stream_in_chunks(encoder, x, [7, 1, 13, 2]), y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mixer,left,right,options,declared", [
    ("summary", 4, 2, {}, 0),
    ("summary", None, [3, 1, 2], {}, 0),
    ("wsm", 8, [2, 3], {}, 5),
    ("wsm", None, 2, {"windows": [[3, 1], [0, 4]]}, 8),
    ("wsm", 5, [1, 0, 2], {"windows": [[2, None]]}, 3),
    ("wsm", 2, [2, 2], {"windows": [[1, 0]]}, 0),
])
def test_declared_lookahead_is_measured(mixer, left, right, options, declared):
    n_layers = 2 if isinstance(right, int) else len(right)
    encoder = make_encoder(mixer, left, right, n_layers=n_layers, **options)
    assert encoder.latency().encoder_lookahead_frames == declared
    measured = measure_lookahead(encoder)
    assert measured.dependency_frames == declared
    assert measured.emission_frames == declared


@pytest.mark.parametrize("mixer,options", [("summary", {"summary": "global"}),
                                            ("wsm", {"summary": "global", "windows": [[2, 1]]})])
def test_global_summary_is_offline_only(mixer, options):
    encoder = make_encoder(mixer, 4, 1, **options)
    latency = encoder.latency()
    assert latency.encoder_lookahead_frames is None and not latency.streamable
    with pytest.raises(ValueError, match=rf"mixer '{mixer}' with mixer_options summary='global'.*cannot stream"):
        encoder.init_state(2)
    measured = measure_lookahead(encoder)
    assert measured.dependency_frames is None and measured.emission_frames is None


def test_default_options_stream_with_the_declared_window():
    summary = make_encoder("summary", 5, [2, 3])
    wsm = make_encoder("wsm", 5, [2, 3])
    unlimited = make_encoder("wsm", None, [2, 3])
    assert summary.latency().streamable and wsm.latency().streamable
    assert [b.mixer.windows for b in wsm.stack.blocks] == [[(5, 2)], [(5, 3)]]
    assert [b.mixer.windows for b in unlimited.stack.blocks] == [[(DEFAULT_WINDOW_LEFT_FRAMES, 2)],
                                                                  [(DEFAULT_WINDOW_LEFT_FRAMES, 3)]]


def largest_tensor(encoder: Encoder, frames: int) -> int:
    x = torch.randn(1, frames, INPUT_DIM, dtype=encoder.dtype)
    with LargestOutput() as recorder:
        y, _ = encoder(x)
        y.sum().backward()
    return recorder.largest


@pytest.mark.parametrize("mixer,left,options", [("summary", None, {}), ("summary", 64, {"summary": "global"}),
                                                 ("wsm", 64, {}), ("wsm", None, {"windows": [[500, 8], [3, 1]]})])
def test_no_time_by_time_tensor_forward_or_backward(mixer, left, options):
    frames = 1500
    encoder = make_encoder(mixer, left, 8, dtype=torch.float32, **options)
    assert largest_tensor(encoder, frames) < frames * frames / 10


def test_time_by_time_detector_sees_maa_mask():
    frames = 1500
    assert largest_tensor(make_encoder("maa", 64, 8, dtype=torch.float32), frames) >= frames * frames


@pytest.mark.parametrize("left,windows", [(6, [(4, 2), (1, 3)]), (None, [(5, 1)]), (0, [(0, 0)])])
def test_streaming_state_is_bounded_by_left_context(left, windows):
    encoder = make_encoder("wsm", left, 0, windows=[list(w) for w in windows])
    lookahead = max(w_right for _, w_right in windows)
    max_left = max(w_left for w_left, _ in windows)
    bounds = {"f": lookahead, "s": (left or 0) + lookahead, "l": max_left + lookahead}
    seen = {key: 0 for key in bounds}
    x = torch.randn(2, 200, INPUT_DIM, dtype=torch.float64)
    state = encoder.init_state(2)
    for t in range(x.shape[1]):
        _, state = encoder.step(x[:, t:t + 1], state)
        for block in state.stack.blocks:
            assert block.residual.shape[1] <= lookahead
            for key, bound in bounds.items():
                size = getattr(block.mixer, key).shape[1]
                assert size <= bound, (key, size, bound)
                seen[key] = max(seen[key], size)
    assert seen == bounds


def hour_long_mixer(left: int | None) -> SummaryMixer:
    """A tiny float32 WSM layer whose features have the non-zero mean trained features have (the
    shifted biases), which makes every prefix sum grow linearly with the stream."""
    torch.manual_seed(0)
    mixer = SummaryMixer("wsm", 8, "causal", left, [(64, 8), (2, 0)], 8, 8, 8).eval()
    with torch.no_grad():
        mixer.s[0].bias += 1.0
        mixer.s_local[0].bias += 1.0
    return mixer


@pytest.mark.parametrize("left", [None, 64])
def test_one_hour_stream_in_float32_matches_offline(left, monkeypatch):
    frames = 180_000  # one hour of 20 ms frames
    mixer = hour_long_mixer(left)
    u = torch.randn(1, frames, 8)
    lengths = torch.tensor([frames])
    lag = mixer.lookahead_frames()
    with torch.no_grad():
        exact = copy.deepcopy(mixer).double()(u.double(), lengths)
        offline = mixer(u, lengths)
        state = mixer.init_state(1, u.device, u.dtype)
        outputs, fed = [], 0
        for start in range(0, frames, 7001):
            piece = u[:, start:start + 7001]
            fed += piece.shape[1]
            count = torch.tensor([piece.shape[1]])
            y, state = mixer.step(piece, Chunk(count, torch.tensor([fed]), torch.tensor([fed])), state)
            outputs.append(y[:, max(0, lag - start):])
        # Flush: padding frames past the end drive out the last ``lag`` outputs.
        pad = torch.tensor([lag])
        y, _ = mixer.step(u[:, :lag] * 0, Chunk(pad, torch.tensor([fed + lag]), torch.tensor([fed])), state)
        streamed = torch.cat(outputs + [y], dim=1)
        assert (offline.double() - exact).abs().max() < 1e-5
        assert (streamed - offline).abs().max() < 1e-4

        # The test has teeth: float32 prefix sums, the naive design, miss the bound by far.
        monkeypatch.setattr(summary_module, "prefix_sums",
                            lambda values: torch.nn.functional.pad(values.cumsum(1), (0, 0, 1, 0)))
        naive = mixer(u, lengths)
    assert (naive.double() - exact).abs().max() > 1e-3


@pytest.mark.parametrize("mixer,options,message", [
    ("summary", {"summary": "mean"}, "summary must be one of"),
    ("summary", {"local_dim": 0}, "local_dim must be a positive integer"),
    ("summary", {"summary_dim": True}, "summary_dim must be a positive integer"),
    ("summary", {"windows": [[1, 1]]}, "unknown mixer_options for 'summary'"),
    ("wsm", {"windows": []}, "windows must be a non-empty list"),
    ("wsm", {"windows": "3,1"}, "windows must be a non-empty list"),
    ("wsm", {"windows": [[1, 2, 3]]}, r"each window must be a \(w_left, w_right\) pair"),
    ("wsm", {"windows": [5]}, r"each window must be a \(w_left, w_right\) pair"),
    ("wsm", {"windows": [[-1, 2]]}, "w_left must be a non-negative integer"),
    ("wsm", {"windows": [[1, 2.5]]}, "w_right must be a non-negative integer"),
    ("wsm", {"window_dim": -4}, "window_dim must be a positive integer"),
    ("wsm", {"window": [[1, 2]]}, "unknown mixer_options for 'wsm'"),
])
def test_bad_options_raise_value_error(mixer, options, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig.tiny(frontend="none", mixer=mixer, mixer_options=options)


def test_options_round_trip_through_yaml(tmp_path):
    config = EncoderConfig.tiny(frontend="none", input_dim=INPUT_DIM, mixer="wsm", right_frames=[1, 2],
                                mixer_options={"windows": [[3, None], [0, 1]], "window_dim": 12})
    path = tmp_path / "wsm.yaml"
    config.save(path)
    loaded = EncoderConfig.load(path)
    assert loaded == config
    encoder = Encoder(loaded)
    assert [b.mixer.windows for b in encoder.stack.blocks] == [[(3, 1), (0, 1)], [(3, 2), (0, 1)]]
    assert encoder.latency().encoder_lookahead_frames == 3
