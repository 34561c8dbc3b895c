"""The attention family (METHODS.md section 2): AA ``full``, MAA ``maa``, SA ``sa`` and LLSA ``llsa``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamssl.mixers.attention_core import KeySource, blocked_band_attention, dense_band_attention
from streamssl.mixers.base import Block, LayerMixer, LayerStack, MixerStack, State, register_mixer


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
        batch, frames, d_model = u.shape
        qkv = self.qkv(u).view(batch, frames, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, o: Tensor) -> Tensor:
        """``(B, H, T, dh)`` -> ``(B, T, D)`` through the output projection."""
        batch, heads, frames, dh = o.shape
        return self.proj(o.transpose(1, 2).reshape(batch, frames, heads * dh))

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

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.qkv.in_features // self.n_heads,
                            device=device, dtype=dtype)
        return {"k": empty, "v": empty, "k_start": 0, "q": empty, "q_start": 0, "t_in": 0}

    def step(self, u: Tensor, state: State, final: bool = False) -> tuple[Tensor, State]:
        q, k, v = self.heads(u)
        keys = torch.cat([state["k"], k], dim=2)
        values = torch.cat([state["v"], v], dim=2)
        queries = torch.cat([state["q"], q], dim=2)
        t_in = state["t_in"] + u.shape[1]
        q_start = state["q_start"]
        ready = queries.shape[2] if final else max(0, t_in - self.right_frames - q_start)
        src = [KeySource(keys, values, self.lo, self.right_frames, state["k_start"])]
        out = self.merge(dense_band_attention(queries[:, :, :ready], src, q_start))
        q_start += ready
        k_start = state["k_start"]
        if self.left_frames is not None:
            drop = max(0, q_start - self.left_frames - k_start)
            keys, values, k_start = keys[:, :, drop:], values[:, :, drop:], k_start + drop
        return out, {"k": keys, "v": values, "k_start": k_start, "q": queries[:, :, ready:],
                     "q_start": q_start, "t_in": t_in}


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

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        c = a = x
        last = len(self.blocks) - 1
        for layer, (block, right) in enumerate(zip(self.blocks, self.right)):
            att: SelfAttention = block.mixer
            qc, kc, vc = att.heads(block.norm1(c))
            qa, ka, va = att.heads(block.norm1(a))
            sources = [KeySource(ka, va, self._lo(), 0), KeySource(kc, vc, 1, right)]
            a_next = block.residual_feed_forward(a, att.merge(blocked_band_attention(qa, sources, lengths, att.block_frames)))
            if layer < last:
                oc = blocked_band_attention(qc, [KeySource(kc, vc, self._lo(), 0)], lengths, att.block_frames)
                c = block.residual_feed_forward(c, att.merge(oc))
            a = a_next
        return a

    def lookahead_frames(self) -> int | None:
        return max(self.right)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        layers = []
        for block in self.blocks:
            empty = block.mixer.init_state(batch_size, device, dtype)["k"]
            residual = torch.zeros(batch_size, 0, block.norm1.normalized_shape[0], device=device, dtype=dtype)
            layers.append({"kc": empty, "vc": empty, "kc_start": 0, "c_in": 0,
                           "ka": empty, "va": empty, "ka_start": 0, "qa": empty, "a_res": residual,
                           "a_next": 0, "a_in": 0})
        return {"layers": layers}

    def _layer_step(self, layer: int, c_new: Tensor, a_new: Tensor, st: State,
                    final: bool) -> tuple[Tensor, Tensor, State]:
        """One layer of both streams. Their frames go through the shared projections and feed-forward
        as one sequence, because with small chunks reading the weights, not arithmetic, is the cost."""
        block = self.blocks[layer]
        att: SelfAttention = block.mixer
        right, lo = self.right[layer], self._lo()
        n_c = c_new.shape[1]
        q, k, v = att.heads(block.norm1(torch.cat([c_new, a_new], dim=1)))
        keys_c = torch.cat([st["kc"], k[:, :, :n_c]], dim=2)
        values_c = torch.cat([st["vc"], v[:, :, :n_c]], dim=2)
        queries = torch.cat([st["qa"], q[:, :, n_c:]], dim=2)
        keys_a = torch.cat([st["ka"], k[:, :, n_c:]], dim=2)
        values_a = torch.cat([st["va"], v[:, :, n_c:]], dim=2)
        residual = torch.cat([st["a_res"], a_new], dim=1)
        c_first, c_in = st["c_in"], st["c_in"] + n_c
        a_in, a_first = st["a_in"] + a_new.shape[1], st["a_next"]
        limit = a_in if final else min(a_in, c_in - right)
        ready = max(0, limit - a_first)
        sources = [KeySource(keys_a, values_a, lo, 0, st["ka_start"]),
                   KeySource(keys_c, values_c, 1, right, st["kc_start"])]
        oa = dense_band_attention(queries[:, :, :ready], sources, a_first)
        # c^N is never read, so the last layer computes only the look-ahead stream.
        n_c_out = n_c if layer < len(self.blocks) - 1 else 0
        oc = dense_band_attention(q[:, :, :n_c_out], [KeySource(keys_c, values_c, lo, 0, st["kc_start"])], c_first)
        out = block.residual_feed_forward(torch.cat([c_new[:, :n_c_out], residual[:, :ready]], dim=1),
                           att.merge(torch.cat([oc, oa], dim=2)))
        c_out, a_out = out[:, :n_c_out], out[:, n_c_out:]
        a_next = a_first + ready

        ka_start, kc_start = st["ka_start"], st["kc_start"]
        if self.left_frames is not None:
            drop_a = max(0, a_next - self.left_frames - ka_start)
            keys_a, values_a, ka_start = keys_a[:, :, drop_a:], values_a[:, :, drop_a:], ka_start + drop_a
            drop_c = max(0, min(c_in - self.left_frames, a_next + 1) - kc_start)
            keys_c, values_c, kc_start = keys_c[:, :, drop_c:], values_c[:, :, drop_c:], kc_start + drop_c
        new_state = {"kc": keys_c, "vc": values_c, "kc_start": kc_start, "c_in": c_in,
                     "ka": keys_a, "va": values_a, "ka_start": ka_start, "qa": queries[:, :, ready:],
                     "a_res": residual[:, ready:], "a_next": a_next, "a_in": a_in}
        return c_out, a_out, new_state

    def step(self, x: Tensor, state: State, final: bool = False) -> tuple[Tensor, State]:
        c = a = x
        layers = []
        for layer, st in enumerate(state["layers"]):
            c, a, st = self._layer_step(layer, c, a, st, final)
            layers.append(st)
        return a, {"layers": layers}


@register_mixer("llsa")
def build_llsa(config) -> MixerStack:
    return LLSAStack(config)
