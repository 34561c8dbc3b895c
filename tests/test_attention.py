"""Attention-family facts: SA computes MAA's function without a T x T tensor; LLSA's look-ahead is one layer's."""

import pytest
import torch

from conftest import LargestOutput, make_encoder
from streamssl import Encoder, EncoderConfig, measure_lookahead
from streamssl.mixers.attention_core import KeySource, blocked_band_attention, dense_band_attention
from streamssl.mixers.window import Chunk, push


@pytest.mark.parametrize("left, right, block", [(4, 2, 3), (0, 0, 1), (None, 3, 5), (7, 1, 64)])
def test_blocked_equals_dense_attention(left, right, block):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 5, dtype=torch.float64, generator=g) for _ in range(3))
    lengths = torch.tensor([37, 20])
    lo = None if left is None else -left
    for sources in ([KeySource(k, v, lo, right)], [KeySource(k, v, lo, 0), KeySource(q, v * 2, 1, right)]):
        dense = dense_band_attention(q, sources, 0, lengths)
        blocked = blocked_band_attention(q, sources, lengths, block)
        assert torch.allclose(dense[0], blocked[0], atol=1e-12)
        assert torch.allclose(dense[1, :, :20], blocked[1, :, :20], atol=1e-12)


def test_sa_and_maa_compute_the_same_function():
    maa = make_encoder("maa", left_frames=5, right_frames=[2, 0, 1], n_layers=3)
    sa = Encoder(EncoderConfig.tiny(mixer="sa", left_frames=5, right_frames=[2, 0, 1], n_layers=3, block_frames=4))
    sa = sa.double().eval()
    sa.load_state_dict(maa.state_dict())
    x = torch.randn(2, 16000, dtype=torch.float64)
    lengths = torch.tensor([16000, 9999])
    with torch.no_grad():
        y_maa, n = maa(x, lengths)
        y_sa, _ = sa(x, lengths)
    for b in range(2):
        assert torch.allclose(y_maa[b, :n[b]], y_sa[b, :n[b]], atol=1e-9, rtol=0)


def test_sa_never_forms_a_t_by_t_tensor_but_maa_does():
    frames = 2000
    kwargs = dict(frontend="none", input_dim=8, left_frames=8, right_frames=2, n_layers=1, n_heads=1)
    x = torch.randn(1, frames, 8, dtype=torch.float64)
    sizes = {}
    for mixer in ("sa", "llsa", "maa"):
        encoder = make_encoder(mixer, **kwargs)
        with torch.no_grad(), LargestOutput() as probe:
            encoder(x)
        sizes[mixer] = probe.largest
    assert sizes["maa"] >= frames * frames
    assert sizes["sa"] < frames * frames / 10
    assert sizes["llsa"] < frames * frames / 10


@pytest.mark.parametrize("layers", [1, 2, 4, 6])
def test_llsa_lookahead_is_one_layer_whatever_the_depth(layers):
    encoder = make_encoder("llsa", frontend="none", input_dim=8, left_frames=4, right_frames=3, n_layers=layers)
    maa = make_encoder("maa", frontend="none", input_dim=8, left_frames=4, right_frames=3, n_layers=layers)
    assert encoder.latency().encoder_lookahead_frames == 3
    measured = measure_lookahead(encoder)
    assert measured.dependency_frames == 3 and measured.emission_frames == 3
    assert measure_lookahead(maa).dependency_frames == 3 * layers


def test_paper_latency_figures():
    """12 layers, 20 ms frames, right_frames=8: MAA and SA 1.92 s, LLSA 0.16 s (docs/methods.md section 2)."""
    with torch.device("meta"):
        latencies = {m: Encoder(EncoderConfig.base(mixer=m, right_frames=8)).latency() for m in ("maa", "sa", "llsa")}
    assert latencies["maa"].encoder_lookahead_ms == pytest.approx(1920.0)
    assert latencies["sa"].encoder_lookahead_ms == pytest.approx(1920.0)
    assert latencies["llsa"].encoder_lookahead_ms == pytest.approx(160.0)
    assert latencies["llsa"].frontend_lookahead_ms == pytest.approx(5.0)
    assert latencies["llsa"].frontend_receptive_field_ms == pytest.approx(25.0)


def test_full_attention_depends_on_the_whole_input():
    encoder = make_encoder("full")
    assert encoder.latency().encoder_lookahead_frames is None
    assert measure_lookahead(encoder, probe_frames=4).dependency_frames is None


def test_push_joins_cache_and_real_frames_per_stream():
    # Two streams, a cache of 3 slots and 2 new slots: stream 0 brings 2 real frames, stream 1 one
    # (its first new slot is filler). Slots older than the cache repeat an arbitrary frame (here the
    # oldest cached one), which callers mask.
    cache = torch.tensor([[1.0, 2.0, 3.0], [11.0, 12.0, 13.0]]).view(2, 3, 1).expand(2, 3, 2)
    new = torch.tensor([[4.0, 5.0], [-1.0, 14.0]]).view(2, 2, 1).expand(2, 2, 2)
    count = torch.tensor([2, 1])
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [11.0, 11.0, 12.0, 13.0, 14.0]]).view(2, 5, 1).expand(2, 5, 2)
    chunk = Chunk(count, torch.tensor([5, 4]), torch.tensor([5, 4]))
    assert torch.equal(push(cache, new, count), expected)
    assert torch.equal(chunk.push(cache, new), expected)
    # Along another dimension (a (B, H, W, dh) cache), and with every frame real (the eager shortcut).
    heads_cache, heads_new = cache.unsqueeze(1).expand(2, 3, 3, 2), new.unsqueeze(1).expand(2, 3, 2, 2)
    assert torch.equal(chunk.push(heads_cache, heads_new, dim=2), expected.unsqueeze(1).expand(2, 3, 5, 2))
    full = Chunk(torch.tensor([2, 2]), torch.tensor([5, 5]), torch.tensor([5, 5]))
    assert torch.equal(full.push(cache, new), torch.cat([cache, new], dim=1))
