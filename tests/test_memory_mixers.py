"""Family-specific tests of the augmented-memory mixers ``amtrf`` (AM-TRF) and ``emformer``.

The offline forms are checked against naive per-segment references written here from docs/methods.md
section 3 (plain softmax attention, Python loops), and the streaming forms against the offline forms.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten, tree_unflatten

import streamssl.mixers.attention_core as attention_core
from conftest import stream_frames, stream_in_chunks
from streamssl import Encoder, EncoderConfig, measure_lookahead
from streamssl.asr.ctc import CTCModel
from streamssl.export import export_model
from streamssl.runtime.model import OnnxModel

torch.set_num_threads(1)
FAMILIES = ["amtrf", "emformer"]
INPUT_DIM = 8


def make(mixer: str, segment: int, left: int | None, right, memory: int, n_layers: int = 2,
         dtype: torch.dtype = torch.float64, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    config = EncoderConfig.tiny(mixer=mixer, frontend="none", input_dim=INPUT_DIM, left_frames=left,
                                right_frames=right, n_layers=n_layers,
                                mixer_options={"segment_frames": segment, "memory_size": memory})
    return Encoder(config).to(dtype).eval()


def frames(batch: int, n: int, seed: int, dtype: torch.dtype = torch.float64, width: int = INPUT_DIM) -> torch.Tensor:
    return torch.randn(batch, n, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- naive references (one utterance)
def naive_attention(att, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Multi-head softmax attention of ``queries`` (Tq, D) over ``keys`` (Tk, D), weights of ``att``."""
    d_model = queries.shape[1]
    heads, dh = att.n_heads, d_model // att.n_heads
    w, b = att.qkv.weight, att.qkv.bias
    q = (queries @ w[:d_model].T + b[:d_model]).view(-1, heads, dh).transpose(0, 1)
    k = (keys @ w[d_model:2 * d_model].T + b[d_model:2 * d_model]).view(-1, heads, dh).transpose(0, 1)
    v = (keys @ w[2 * d_model:].T + b[2 * d_model:]).view(-1, heads, dh).transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1)
    return att.proj((probs @ v).transpose(0, 1).reshape(-1, d_model))


def last(items: list, n: int | None) -> list:
    return items if n is None else items[len(items) - min(n, len(items)):]


def stacked(items: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(items) if items else like.new_zeros(0, like.shape[-1])


def amtrf_reference(stack, x: torch.Tensor) -> torch.Tensor:
    """AM-TRF on one utterance ``x`` (T, D), block by block as docs/methods.md section 3 states it."""
    c, left, right, m = stack.segment_frames, stack.left_frames, stack.right_frames, stack.memory_size
    banks: list[list[torch.Tensor]] = [[] for _ in stack.blocks]
    outputs = []
    for start in range(0, x.shape[0], c):
        first = 0 if left is None else max(0, start - left)
        h = x[first:start + c + right]
        centre = slice(start - first, start - first + min(c, x.shape[0] - start))
        for block, bank in zip(stack.blocks, banks):
            u = block.norm1(h)
            summary = u[centre].mean(dim=0, keepdim=True)
            mixed = naive_attention(block.mixer, torch.cat([u, summary]), torch.cat([stacked(last(bank, m), u), u]))
            if m > 0:
                bank.append(torch.tanh(mixed[-1]))
            h = block.residual_feed_forward(h, mixed[:-1])
        outputs.append(h[centre])
    return torch.cat(outputs)


def emformer_reference(stack, x: torch.Tensor) -> torch.Tensor:
    """Emformer on one utterance ``x`` (T, D), segment by segment: cached left context (the layer's
    normalised centre frames of earlier segments), memory from the layer below (layer 0: mean of the
    segment's input), right context carried as its own block, summary not attending to memory."""
    c, left, right, m = stack.segment_frames, stack.left_frames, stack.right_frames, stack.memory_size
    banks: list[list[torch.Tensor]] = [[] for _ in stack.blocks]
    past: list[list[torch.Tensor]] = [[] for _ in stack.blocks]
    outputs = []
    for start in range(0, x.shape[0], c):
        centre = x[start:start + c]
        right_block = x[start + c:start + c + right] if start + c <= x.shape[0] else x[:0]
        made = centre.mean(dim=0)
        for layer, block in enumerate(stack.blocks):
            u_centre, u_right = block.norm1(centre), block.norm1(right_block)
            context = torch.cat([stacked(last(past[layer], left), x), u_centre, u_right])
            memory = stacked(last(banks[layer], m), x)
            mixed = naive_attention(block.mixer, torch.cat([u_centre, u_right]), torch.cat([memory, context]))
            summary = naive_attention(block.mixer, u_centre.mean(dim=0, keepdim=True), context)
            banks[layer].append(made)
            made = torch.tanh(summary[0])
            past[layer].extend(u_centre)
            centre = block.residual_feed_forward(centre, mixed[:centre.shape[0]])
            right_block = block.residual_feed_forward(right_block, mixed[centre.shape[0]:])
        outputs.append(centre)
    return torch.cat(outputs)


REFERENCES = {"amtrf": amtrf_reference, "emformer": emformer_reference}


@pytest.mark.parametrize("mixer", FAMILIES)
@pytest.mark.parametrize("segment, left, right, memory", [(4, 5, 2, 3), (3, 0, 0, 0), (2, None, 1, 2),
                                                          (5, 3, 4, 1), (1, 2, 1, 5)])
def test_offline_form_equals_naive_reference(mixer, segment, left, right, memory):
    encoder = make(mixer, segment, left, right, memory, n_layers=3)
    x = frames(3, 23, seed=segment + memory, width=encoder.config.d_model)
    lengths = torch.tensor([23, 17, 6])  # 17 and 6: a short last segment (and one inside the first segment)
    with torch.no_grad():
        y = encoder.stack(x, lengths)
        for b in range(3):
            expected = REFERENCES[mixer](encoder.stack, x[b, :lengths[b]])
            assert torch.allclose(y[b, :lengths[b]], expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mixer", FAMILIES)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streaming_equals_forward_and_padding_is_invisible(mixer, data):
    segment = data.draw(st.integers(1, 6), label="C")
    left = data.draw(st.one_of(st.none(), st.integers(0, 9)), label="L")
    right = data.draw(st.integers(0, 4), label="R")
    memory = data.draw(st.integers(0, 4), label="M")
    layers = data.draw(st.integers(1, 3), label="layers")
    batch = data.draw(st.integers(1, 3), label="batch")
    n = data.draw(st.integers(1, 40), label="T")
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=5), label="chunks")
    lengths = data.draw(st.lists(st.integers(1, n), min_size=batch, max_size=batch), label="lengths")
    encoder = make(mixer, segment, left, right, memory, layers)
    x = frames(batch, n, seed=n)
    with torch.no_grad():
        offline, _ = encoder(x)
        assert torch.allclose(stream_in_chunks(encoder, x, sizes), offline, atol=1e-9, rtol=0)
        lengths = torch.tensor(lengths)
        padded = x.clone()
        padded[torch.arange(n) >= lengths[:, None]] = 1e3  # loud garbage in the padding
        y, _ = encoder(padded, lengths)
        for b in range(batch):
            alone, _ = encoder(x[b:b + 1, :lengths[b]])
            assert torch.allclose(y[b, :lengths[b]], alone[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("mixer", FAMILIES)
def test_streaming_equals_forward_float32(mixer):
    encoder = make(mixer, 4, 6, [2, 2], 3, dtype=torch.float32)
    x = frames(2, 43, seed=5, dtype=torch.float32)
    with torch.no_grad():
        offline, _ = encoder(x)
    for sizes in ([1], [3, 7], [43]):
        assert torch.allclose(stream_in_chunks(encoder, x, sizes), offline, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mixer", FAMILIES)
@pytest.mark.parametrize("segment, left, right, memory, layers", [(4, 3, 2, 2, 3), (3, 0, 0, 1, 2),
                                                                  (5, None, 3, 0, 2), (2, 6, 1, 4, 1)])
def test_probe_confirms_declared_lookahead(mixer, segment, left, right, memory, layers):
    encoder = make(mixer, segment, left, right, memory, layers)
    declared = encoder.latency()
    assert declared.encoder_lookahead_frames == segment - 1 + right  # not compounded by depth
    assert declared.encoder_mean_lookahead_frames == (segment - 1) / 2 + right
    measured = measure_lookahead(encoder, probe_frames=3 * segment)
    assert measured.dependency_frames == declared.encoder_lookahead_frames
    assert measured.dependency_mean_frames == declared.encoder_mean_lookahead_frames
    assert measured.emission_frames == declared.encoder_lookahead_frames
    assert measured.emission_mean_frames == declared.encoder_mean_lookahead_frames


def _changed(encoder: Encoder, frame: int, output: int, n: int = 16) -> bool:
    """Whether the stack's output frame ``output`` changes when its input frame ``frame`` is perturbed
    (the stack alone: the encoder's positional convolution would mix neighbouring frames)."""
    x = frames(1, n, seed=frame, width=encoder.config.d_model)
    bumped = x.clone()
    bumped[:, frame] += torch.randn(x.shape[2], generator=torch.Generator().manual_seed(n), dtype=x.dtype)
    lengths = torch.tensor([n])
    with torch.no_grad():
        before, after = encoder.stack(x, lengths)[:, output], encoder.stack(bumped, lengths)[:, output]
    return not torch.allclose(before, after, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mixer", FAMILIES)
def test_memory_carries_information_past_the_left_context(mixer):
    # C=2, L=0, R=0: without memory, segment 5 (frames 10, 11) sees only itself.
    with_memory = make(mixer, 2, 0, 0, 3, n_layers=3)
    without = make(mixer, 2, 0, 0, 0, n_layers=3)
    assert _changed(with_memory, 7, 10)
    assert not _changed(without, 7, 10)
    assert not _changed(without, 9, 10)
    assert _changed(without, 11, 10)


def test_amtrf_memory_bank_is_a_recurrence():
    # C=2, L=0, R=0, M=1. AM-TRF's summary attends to its own layer's memory, so information travels
    # back through the chain of summaries, far beyond M segments. Emformer's summary does not attend to
    # memory and layer 0's memory is the input mean: two layers reach exactly one segment back.
    assert _changed(make("amtrf", 2, 0, 0, 1, n_layers=1), 1, 14)
    emformer = make("emformer", 2, 0, 0, 1, n_layers=2)
    assert _changed(emformer, 12, 14)
    assert not _changed(emformer, 11, 14)


def test_emformer_caches_left_context_amtrf_recomputes_it():
    # One layer, C=2, L=2, R=0, M=0: both see frames [iC-2, iC+2). With two layers Emformer's cached
    # left context carries the previous segment's own left context (so frame 6 reaches output 10);
    # AM-TRF recomputes the left context inside the block and cannot see before frame 8.
    assert not _changed(make("amtrf", 2, 2, 0, 0, n_layers=2), 7, 10)
    assert _changed(make("emformer", 2, 2, 0, 0, n_layers=2), 7, 10)
    assert _changed(make("emformer", 2, 2, 0, 0, n_layers=2), 6, 10)
    assert not _changed(make("emformer", 2, 2, 0, 0, n_layers=2), 5, 10)


def test_emformer_training_form_does_not_loop_over_segments(monkeypatch):
    calls = []
    original = attention_core.dense_band_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original_biased = attention_core.biased_attention

    def counting_biased(*args, **kwargs):
        calls.append(1)
        return original_biased(*args, **kwargs)

    monkeypatch.setattr("streamssl.mixers.memory.dense_band_attention", counting)
    monkeypatch.setattr("streamssl.mixers.memory.biased_attention", counting_biased)
    counts = {}
    for mixer in FAMILIES:
        encoder = make(mixer, 2, 4, 1, 2, n_layers=3)
        for n in (20, 80):
            calls.clear()
            with torch.no_grad():
                encoder(frames(2, n, seed=1))
            counts[mixer, n] = len(calls)
    assert counts["emformer", 20] == counts["emformer", 80] > 0
    assert counts["amtrf", 80] > counts["amtrf", 20]  # the memory recurrence loops over segments


def _state_numel(state) -> int:
    return sum(t.numel() for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("mixer", FAMILIES)
def test_state_is_bounded_for_long_streams(mixer):
    encoder = make(mixer, 3, 5, 2, 2)
    state = encoder.init_state(2)
    sizes = []
    with torch.no_grad():
        for i in range(80):
            _, state = encoder.step(frames(2, 1 + i % 7, seed=i), state)
            sizes.append(_state_numel(state.stack))
    assert max(sizes[40:]) == max(sizes[10:40])


class _Step(torch.nn.Module):
    """``encoder.step_window`` as a function of the state's tensors."""

    def __init__(self, encoder, state):
        super().__init__()
        self.encoder = encoder
        self.spec = tree_flatten(state)[1]

    def forward(self, chunk: torch.Tensor, *tensors: torch.Tensor):
        y, emitted, state = self.encoder.step_window(chunk, tree_unflatten(list(tensors), self.spec))
        return (y, emitted, *tree_flatten(state)[0])


@pytest.mark.parametrize("mixer", FAMILIES)
def test_step_exports_and_the_export_keeps_streaming(mixer):
    """``torch.export`` one step (chunk = one segment) from a fresh state: exporting fails on a value
    read out of a tensor. The exported step then streams on by itself (its own state), cold start
    included, and matches the eager one."""
    segment = 3
    encoder = make(mixer, segment, 4, 2, 2)
    x = frames(2, 30 * segment, seed=11)
    state = encoder.init_state(2)
    with torch.no_grad():
        step = _Step(encoder, state)
        tensors = tree_flatten(state)[0]
        exported = torch.export.export(step, (x[:, :segment], *tensors)).module()
        for i in range(30):
            chunk = x[:, i * segment:(i + 1) * segment]
            y, emitted, state = encoder.step_window(chunk, state)
            exported_y, exported_emitted, *tensors = exported(chunk, *tensors)
            assert torch.equal(exported_emitted, emitted)
            assert torch.allclose(exported_y, y, atol=1e-12, rtol=0)
        assert emitted.tolist() == [segment, segment]


@pytest.mark.parametrize("mixer", FAMILIES)
@pytest.mark.parametrize("segment, memory", [(2, 0), (1, 3)])
def test_onnx_step_without_memory_and_with_several_segments_per_chunk(mixer, segment, memory):
    """The ONNX export where the shared export tests do not go: no memory (empty banks), and 4-frame
    chunks completing several segments per step; ONNX Runtime streaming equals the offline form."""
    torch.manual_seed(0)
    model = CTCModel(EncoderConfig.tiny(mixer=mixer, frontend="none", input_dim=INPUT_DIM, left_frames=6,
                                        right_frames=2,
                                        mixer_options={"segment_frames": segment, "memory_size": memory})).eval()
    data, info = export_model(model, 80)
    assert info.chunk_samples == 4
    runtime = OnnxModel(data)
    x = frames(1, 31, seed=4, dtype=torch.float32)
    with torch.no_grad():
        offline, _ = model.encoder(x)
        reference = model.output(offline).log_softmax(-1)[0].numpy()
    streamed = stream_frames(runtime, x, 4).numpy()
    assert streamed.shape == reference.shape
    assert np.abs(streamed - reference).max() < 1e-4


@pytest.mark.parametrize("mixer", FAMILIES)
def test_training_form_has_finite_gradients_everywhere(mixer):
    encoder = make(mixer, 3, 4, 1, 2, n_layers=2, dtype=torch.float32).train()
    x = frames(2, 25, seed=2, dtype=torch.float32)
    lengths = torch.tensor([25, 11])
    y, _ = encoder(x, lengths)
    mask = torch.arange(25) < lengths[:, None]
    (y * mask[..., None]).pow(2).sum().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradients: {missing}"


@pytest.mark.parametrize("mixer", FAMILIES)
@pytest.mark.parametrize("options, message", [({"segment_frames": 0}, "segment_frames"),
                                              ({"segment_frames": 2.5}, "segment_frames"),
                                              ({"segment_frames": True}, "segment_frames"),
                                              ({"memory_size": -1}, "memory_size"),
                                              ({"memory": 3}, "unknown mixer_options")])
def test_bad_options_are_refused(mixer, options, message):
    with pytest.raises(ValueError, match=message):
        EncoderConfig.tiny(mixer=mixer, mixer_options=options)


@pytest.mark.parametrize("mixer", FAMILIES)
def test_per_layer_right_context_must_agree(mixer):
    with pytest.raises(ValueError, match="one right_frames for every layer"):
        Encoder(EncoderConfig.tiny(mixer=mixer, right_frames=[1, 2]))
    assert Encoder(EncoderConfig.tiny(mixer=mixer, right_frames=[2, 2])).latency().encoder_lookahead_frames == 5
