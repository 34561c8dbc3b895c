"""The attention family (docs/methods.md section 2): AA ``full``, MAA ``maa``, SA ``sa`` and LLSA ``llsa``."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from streamssl.mixers.attention_core import (KeySource, biased_attention, blocked_band_attention,
                                             dense_band_attention, visible_bias)
from streamssl.mixers.base import Block, LayerMixer, LayerStack, MixerStack, register_mixer
from streamssl.mixers.window import Chunk, batch_dim, keep_last, key_mask, output_mask, size, streaming_state


@streaming_state
class AttentionState:
    """One attention layer: keys and values ``(B, H, W, 2 * D/H)`` (concatenated on the last dim) of the
    last ``W = left_frames + right_frames`` frames (every frame so far when ``left_frames`` is None), and
    the queries ``(B, H, right_frames, D/H)`` still waiting for their look-ahead."""

    kv: Tensor
    q: Tensor


def default_block_frames(config) -> int:
    """Query block size of the blockwise forms: about the band width, which balances the key-window
    copies (``T/C * (C+L+R)`` frames) against the scores (``T * (C+L+R)``)."""
    if config.block_frames is not None:
        return config.block_frames
    if config.left_frames is None:
        return 64
    return max(16, config.left_frames + max(config.right_frames_per_layer()))


class SelfAttention(LayerMixer):
    """Multi-head self-attention restricted to the band ``[t - left_frames, t + right_frames]``.

    ``form`` picks the offline computation: ``"dense"`` (a ``T x T`` mask, MAA and AA) or ``"blocked"``
    (SA). Streaming always works on a small window: the layer keeps the keys/values of the last
    ``left_frames`` frames and the queries still waiting for their ``right_frames`` of look-ahead.
    """

    def __init__(self, d_model: int, n_heads: int, left_frames: int | None, right_frames: int | None,
                 form: str = "dense", block_frames: int = 64):
        super().__init__()
        if form not in ("dense", "blocked"):
            raise ValueError(f"unknown attention form {form!r}")
        self.n_heads = n_heads
        self.left_frames = left_frames
        self.right_frames = right_frames
        self.form = form
        self.block_frames = block_frames
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    @property
    def lo(self) -> int | None:
        return None if self.left_frames is None else -self.left_frames

    def heads(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, T, D)`` -> q, k, v each ``(B, H, T, D/H)``."""
        frames, d_model = size(u, 1), size(u, 2)
        qkv = self.qkv(u).view(batch_dim(u), frames, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def query_kv(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, D)`` -> q ``(B, H, T, D/H)`` and keys and values ``(B, H, T, 2 D/H)`` concatenated on the
        last dim (the streaming caches' layout), in one copy each."""
        frames, d_model = size(u, 1), size(u, 2)
        dh = d_model // self.n_heads
        batch = batch_dim(u)
        qkv = self.qkv(u).view(batch, frames, 3, self.n_heads, dh)
        kv = qkv[:, :, 1:].permute(0, 3, 1, 2, 4).reshape(batch, self.n_heads, frames, 2 * dh)
        return qkv[:, :, 0].transpose(1, 2), kv

    def merge(self, o: Tensor) -> Tensor:
        """``(B, H, T, dh)`` -> ``(B, T, D)`` through the output projection."""
        heads, frames, dh = size(o, 1), size(o, 2), size(o, 3)
        return self.proj(o.transpose(1, 2).reshape(batch_dim(o), frames, heads * dh))

    def forward(self, u: Tensor, lengths: Tensor) -> Tensor:
        q, k, v = self.heads(u)
        src = [KeySource(k, v, self.lo, self.right_frames)]
        if self.form == "blocked":
            return self.merge(blocked_band_attention(q, src, lengths, self.block_frames))
        return self.merge(dense_band_attention(q, src, 0, lengths))

    def lookahead_frames(self) -> int | None:
        return self.right_frames

    def stream_error(self) -> str | None:
        if self.right_frames is None:
            return ("mixer 'full' (AA) attends to the whole utterance and cannot stream; "
                    "use 'maa', 'sa' or 'llsa' for streaming")
        return None

    def _zeros(self, batch_size: int, frames: int, width: int, device: torch.device,
               dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, self.n_heads, frames, width * (self.qkv.in_features // self.n_heads),
                           device=device, dtype=dtype)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        left = 0 if self.left_frames is None else self.left_frames
        return AttentionState(self._zeros(batch_size, left + self.right_frames, 2, device, dtype),
                              self._zeros(batch_size, self.right_frames, 1, device, dtype))

    def step(self, u: Tensor, chunk: Chunk, state: AttentionState) -> tuple[Tensor, AttentionState]:
        n = size(u, 1)
        q, kv = self.query_kv(u)
        kv = chunk.push(state.kv, kv, dim=2)
        queries = chunk.push(state.q, q, dim=2)
        width, dh = size(kv, 2), size(q, 3)
        bias = chunk.memo(("band", width, n, self.left_frames, self.right_frames, u.dtype),
                          lambda: self._step_bias(chunk, width, n, u.dtype))
        out = self.merge(biased_attention(queries[:, :, :n], kv[..., :dh], kv[..., dh:], bias))
        keep = None if self.left_frames is None else self.left_frames + self.right_frames
        return out, AttentionState(keep_last(kv, keep, dim=2), keep_last(queries, self.right_frames, dim=2))

    def _step_bias(self, chunk: Chunk, width: int, n: int, dtype: torch.dtype) -> Tensor:
        """``(B, 1, n, width)``: the step's band and key validity as an attention bias. Query slot ``o`` is at
        position ``end - R - n + o``, key slot ``i`` at ``end - width + i``: their distance, hence the band,
        does not depend on ``end``, only which keys exist does."""
        band = _band(width, n, self.left_frames, self.right_frames, chunk.end.device)
        return visible_bias(band & key_mask(chunk, ((width, 0),), n).unsqueeze(1), dtype).unsqueeze(1)


@lru_cache(maxsize=None)
def _band(width: int, n: int, left: int | None, right: int, device: torch.device) -> Tensor:
    """``(n, width)`` bool: which keys of :meth:`SelfAttention._step_bias`'s window each query may see
    (numpy, so that a step being traced records a constant, not the arithmetic)."""
    rel = (np.arange(width) - width)[None, :] - (np.arange(n) - right - n)[:, None]
    visible = (rel <= right) & (True if left is None else rel >= -left)
    return torch.from_numpy(visible).to(device)


def attention_blocks(config, form: str, right: list[int | None], left: int | None) -> list[Block]:
    block_frames = default_block_frames(config)
    return [Block(config.d_model, config.ffn_dim, config.dropout,
                  SelfAttention(config.d_model, config.n_heads, left, r, form, block_frames))
            for r in right]


@register_mixer("full")
def build_full(config) -> MixerStack:
    """AA: every valid frame attends to every valid frame. Offline only."""
    return LayerStack(attention_blocks(config, "dense", [None] * config.n_layers, None))


@register_mixer("maa")
def build_maa(config) -> MixerStack:
    """MAA: the band ``[t-L, t+R]`` as a dense ``T x T`` mask (the baseline)."""
    return LayerStack(attention_blocks(config, "dense", list(config.right_frames_per_layer()), config.left_frames))


@register_mixer("sa")
def build_sa(config) -> MixerStack:
    """SA: MAA's function, computed blockwise without a ``T x T`` tensor."""
    return LayerStack(attention_blocks(config, "blocked", list(config.right_frames_per_layer()), config.left_frames))


class LLSAStack(MixerStack):
    """Low-latency streaming attention: a causal stream ``c`` and a look-ahead stream ``a`` sharing
    every weight. Layer ``l``'s look-ahead queries see their own past ``a^l[t-L..t]`` and the causal
    stream's future ``c^l[t+1..t+R_l]``; since ``c`` never looks ahead, the output ``a^N`` depends on
    input up to ``t + max_l R_l`` whatever the depth. ``c^N`` is never used, so the last layer skips it.
    """

    def __init__(self, config):
        super().__init__()
        self.right = list(config.right_frames_per_layer())
        self.left_frames = config.left_frames
        self.blocks = nn.ModuleList(attention_blocks(config, "blocked", [0] * config.n_layers, config.left_frames))

    def _lo(self) -> int | None:
        return None if self.left_frames is None else -self.left_frames

    supports_checkpointing = True

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        c = a = x
        for layer in range(len(self.blocks)):
            c, a = self.run_block(self._layer, layer, c, a, lengths)
        return a

    def _layer(self, layer: int, c: Tensor, a: Tensor, lengths: Tensor) -> tuple[Tensor | None, Tensor]:
        """One layer of the training form: ``(c^l, a^l)`` -> ``(c^{l+1}, a^{l+1})``, no ``c`` after the last."""
        block, right = self.blocks[layer], self.right[layer]
        att: SelfAttention = block.mixer
        qc, kc, vc = att.heads(block.norm1(c))
        qa, ka, va = att.heads(block.norm1(a))
        sources = [KeySource(ka, va, self._lo(), 0), KeySource(kc, vc, 1, right)]
        a_next = block.residual_feed_forward(a, att.merge(blocked_band_attention(qa, sources, lengths, att.block_frames)))
        if layer == len(self.blocks) - 1:
            return None, a_next
        oc = blocked_band_attention(qc, [KeySource(kc, vc, self._lo(), 0)], lengths, att.block_frames)
        return block.residual_feed_forward(c, att.merge(oc)), a_next

    def lookahead_frames(self) -> int | None:
        return max(self.right)

    def _lags(self) -> list[int]:
        """Lag of the look-ahead stream entering each layer, and leaving the last: ``max`` of the ``R`` below."""
        lags = [0]
        for right in self.right:
            lags.append(max(lags[-1], right))
        return lags

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> "LLSAState":
        lags = self._lags()
        left = 0 if self.left_frames is None else self.left_frames
        layers = []
        for layer, block in enumerate(self.blocks):
            att: SelfAttention = block.mixer
            delay = lags[layer + 1] - lags[layer]
            d_model = block.norm1.normalized_shape[0]
            layers.append(LLSALayerState(
                kv_c=att._zeros(batch_size, max(left, lags[layer + 1] - 1), 2, device, dtype),
                kv_a=att._zeros(batch_size, left + delay, 2, device, dtype),
                q_a=att._zeros(batch_size, delay, 1, device, dtype),
                residual_a=torch.zeros(batch_size, delay, d_model, device=device, dtype=dtype)))
        return LLSAState(layers)

    def _layer_step(self, layer: int, c_new: Tensor, a_new: Tensor, chunk: Chunk, lag_in: int, lag_out: int,
                    st: "LLSALayerState") -> tuple[Tensor, Tensor, "LLSALayerState"]:
        """One layer of both streams. ``c_new`` is at the stack's positions, ``a_new`` ``lag_in`` frames and
        the layer's output ``lag_out`` frames behind. With small chunks a step's cost is its operator
        count and reading the weights, so both streams' frames go through the shared projections and
        feed-forward as one sequence, and their queries through one attention call over the look-ahead
        stream's keys followed by the causal stream's, with the mask of both bands (made once per step)."""
        block = self.blocks[layer]
        att: SelfAttention = block.mixer
        n = size(c_new, 1)
        delay = lag_out - lag_in
        # c^N is never read, so the last layer computes only the look-ahead stream.
        n_c = n if layer < len(self.blocks) - 1 else 0
        x = torch.cat([c_new, a_new], dim=1)
        q, kv = att.query_kv(block.norm1(x))
        kv_c = chunk.push(st.kv_c, kv[:, :, :n], dim=2)
        kv_a = chunk.push(st.kv_a, kv[:, :, n:], dim=2)
        if delay:
            waiting_a = chunk.push(st.q_a, q[:, :, n:], dim=2)
            residual_a = chunk.push(st.residual_a, a_new)
            queries = torch.cat([q[:, :, :n_c], waiting_a[:, :, :n]], dim=2)
            residual = torch.cat([c_new[:, :n_c], residual_a[:, :n]], dim=1)
        else:  # the look-ahead queries are answered at once: both streams' rows are in place already
            waiting_a, residual_a = q[:, :, n:], a_new
            queries, residual = q[:, :, n - n_c:], x[:, n - n_c:]
        keys = torch.cat([kv_a, kv_c], dim=2)
        width_a, width_c, dh = size(kv_a, 2), size(kv_c, 2), size(q, 3)
        right = self.right[layer]
        bias = chunk.memo(("llsa", lag_in, lag_out, n, n_c, width_a, width_c, right, x.dtype),
                          lambda: self._step_bias(chunk, lag_in, lag_out, n, n_c, width_a, width_c, right, x.dtype))
        mixed = att.merge(biased_attention(queries, keys[..., :dh], keys[..., dh:], bias))
        out = block.residual_feed_forward(residual, mixed)
        keep_a = None if self.left_frames is None else self.left_frames + delay
        keep_c = None if self.left_frames is None else size(st.kv_c, 2)
        new_state = LLSALayerState(keep_last(kv_c, keep_c, dim=2), keep_last(kv_a, keep_a, dim=2),
                                   keep_last(waiting_a, delay, dim=2), keep_last(residual_a, delay))
        return out[:, :n_c], out[:, n_c:], new_state

    def _step_bias(self, chunk: Chunk, lag_in: int, lag_out: int, n: int, n_c: int, width_a: int, width_c: int,
                   right: int, dtype: torch.dtype) -> Tensor:
        """``(B, 1, n_c + n, width_a + width_c)``: which keys a layer step's queries see, as an attention bias.

        Queries: ``n_c`` causal ones at ``end - n + o``, then ``n`` look-ahead ones at ``end - lag_out - n + o``.
        Keys: the look-ahead stream's window (``width_a`` slots ending at ``end - lag_in``), then the causal
        stream's (``width_c`` ending at ``end``). A causal query sees the causal keys of ``[t - L, t]``; a
        look-ahead query its own stream's ``[t - L, t]`` and the causal stream's ``[t + 1, t + right]``.
        """
        band = _llsa_band(lag_in, lag_out, n, n_c, width_a, width_c, self.left_frames, right, chunk.end.device)
        valid = key_mask(chunk, ((width_a, lag_in), (width_c, 0)), n)
        return visible_bias(band & valid.unsqueeze(1), dtype).unsqueeze(1)

    def step(self, x: Tensor, chunk: Chunk, state: "LLSAState") -> tuple[Tensor, Tensor, "LLSAState"]:
        c = a = x
        lags = self._lags()
        layers = []
        for layer, st in enumerate(state.layers):
            c, a, st = self._layer_step(layer, c, a, chunk, lags[layer], lags[layer + 1], st)
            layers.append(st)
        return a, output_mask(chunk.lagged(lags[-1]), size(a, 1)), LLSAState(layers)


@lru_cache(maxsize=None)
def _llsa_band(lag_in: int, lag_out: int, n: int, n_c: int, width_a: int, width_c: int, left: int | None,
               right: int, device: torch.device) -> Tensor:
    """``(n_c + n, width_a + width_c)`` bool: the bands of :meth:`LLSAStack._step_bias`. Positions are taken
    from ``end``; a query's distance to a key, hence what it may see, does not depend on ``end`` (numpy,
    so that a step being traced records a constant)."""
    key_pos = np.concatenate([np.arange(width_a) - lag_in - width_a, np.arange(width_c) - width_c])
    query_pos = np.concatenate([np.arange(n_c) - n, np.arange(n) - lag_out - n])
    rel = key_pos[None, :] - query_pos[:, None]                                               # (Tq, Tk)
    past = (rel <= 0) & (True if left is None else rel >= -left)
    future = (rel >= 1) & (rel <= right)
    lookahead_key = (np.arange(width_a + width_c) < width_a)[None, :]
    lookahead_query = (np.arange(n_c + n) >= n_c)[:, None]
    causal_key = np.where(lookahead_query, future, past)
    return torch.from_numpy(np.where(lookahead_key, lookahead_query & past, causal_key)).to(device)


@streaming_state
class LLSALayerState:
    """One LLSA layer (``W`` as in :class:`AttentionState`, ``d`` = this layer's added lag of the
    look-ahead stream): the causal stream's keys/values ``kv_c`` ``(B, H, max(L, lag_out - 1), 2 D/H)``,
    the look-ahead stream's keys/values ``kv_a`` ``(B, H, L + d, 2 D/H)``, its waiting queries ``q_a``
    ``(B, H, d, D/H)`` and their residuals ``residual_a`` ``(B, d, D)``."""

    kv_c: Tensor
    kv_a: Tensor
    q_a: Tensor
    residual_a: Tensor


@streaming_state
class LLSAState:
    layers: list[LLSALayerState]


@register_mixer("llsa")
def build_llsa(config) -> MixerStack:
    return LLSAStack(config)
