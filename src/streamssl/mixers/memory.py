"""Augmented-memory attention (METHODS.md section 3): AM-TRF ``amtrf`` and Emformer ``emformer``.

Both cut the frames into segments of ``C`` frames and compute each segment's outputs from a small
block of frames plus a bank of at most ``M`` memory vectors summarising earlier segments. A segment
``i`` covers frames ``[iC, iC + C)``; its outputs are final once frames up to ``iC + C + R - 1``
are known, so a frame at position ``k`` of its segment waits ``C - 1 - k + R`` frames.

* **AM-TRF** (Wu et al., 2020). Block ``i`` is the input frames ``[iC - L, iC + C + R)``; it runs
  through the whole stack on its own, so left and right context are recomputed in every block and
  look-ahead does not compound with depth. In every layer the block's frames and a summary query
  (the mean of the block's centre frames) attend to the layer's memory bank and the block's frames;
  ``tanh`` of the summary's output is appended to the same layer's bank. The bank makes the layer a
  recurrence over segments, so training loops over segments (only for the one summary query per
  segment: the block frames of all segments are attended to in parallel).
* **Emformer** (Shi et al., 2021). Segment ``i``'s centre frames are computed once, on the main
  sequence; each layer's keys/values of the last ``L`` centre frames are cached instead of
  recomputed. The ``R`` look-ahead frames are "right-context blocks": per segment a copy of the
  next ``R`` input frames, carried through the layers beside the main sequence. Layer ``l`` reads the
  memory made by layer ``l - 1`` (layer 0 reads the mean of each segment's input frames), and the
  summary query does not attend to memory. Nothing in a layer depends on another segment of the same
  layer except through keys already computed, so the training form processes every segment at once.

A short last segment sees exactly what the streaming form sees at the end of a stream: only the
frames that exist. Offline, every block is laid out left-aligned from its first existing frame and
all frames at or past an utterance's length are masked, so padding never reaches a valid output.
Both forms run the same segment code (``_segments``); streaming runs it on the segments that became
ready, with the lengths set to the frames received, which is how the offline form treats a shorter
utterance. The attention core masks keys by a per-row count, so each segment's keys (memory, context,
right context) are packed valid-first before the softmax.

``left_frames=None`` means unlimited left context: AM-TRF then recomputes the whole past in every block
(cost quadratic in T), Emformer caches every past key (state grows with the stream). ``right_frames``
must be one value for every layer: it is the right context of a segment's block, not a per-layer band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from streamssl.mixers.attention import SelfAttention
from streamssl.mixers.attention_core import KeySource, dense_band_attention
from streamssl.mixers.base import Block, MixerStack, State, register_mixer


@dataclass
class MemoryOptions:
    """Options of ``amtrf`` and ``emformer`` (``EncoderConfig.mixer_options``).

    segment_frames: ``C``, frames per segment (centre of a block); at least 1.
    memory_size: ``M``, memory vectors a layer keeps from earlier segments; 0 disables memory.
    """

    segment_frames: int = 4
    memory_size: int = 4

    def __post_init__(self) -> None:
        for name, low in (("segment_frames", 1), ("memory_size", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"mixer_options.{name} must be an integer >= {low}, got {value!r}")


def _pack(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Join key/value parts whose valid entries are a prefix of each part, valid entries first.

    Args:
        parts: ``(k, v, count)`` with ``k``, ``v`` of shape ``(N, H, K_p, dh)`` and ``count`` ``(N,)``:
            the first ``count[n]`` entries of row ``n`` are valid keys.
    Returns:
        ``k``, ``v`` of shape ``(N, H, sum K_p, dh)`` with every row's valid keys first (in part order),
        and the number of valid keys per row ``(N,)``, ready for ``key_lengths`` of the attention core.
    """
    k = torch.cat([p[0] for p in parts], dim=2)
    v = torch.cat([p[1] for p in parts], dim=2)
    valid = torch.cat([torch.arange(p[0].shape[2], device=k.device) < p[2].unsqueeze(1) for p in parts], dim=1)
    rows, heads, width, dh = k.shape
    position = torch.arange(width, device=k.device)
    order = torch.argsort(torch.where(valid, position, position + width), dim=1)
    # One index_select over all rows' keys: far cheaper on CPU than gather with an expanded index.
    index = (order + torch.arange(rows, device=k.device).unsqueeze(1) * width).reshape(-1)

    def take(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(rows * width, heads, dh).index_select(0, index).view(
            rows, width, heads, dh).transpose(1, 2)

    return take(k), take(v), valid.sum(dim=1)


def _attend(q: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Every query of row ``n`` attends to the valid keys of that row's parts. ``q`` ``(N, H, Tq, dh)``."""
    k, v, counts = _pack(parts)
    return dense_band_attention(q, [KeySource(k, v, None, None)], 0, counts)


def _counts(lengths: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Valid frames of the ranges ``[start_s, end_s)`` for utterances of ``lengths`` frames: ``(B, S)``."""
    return (torch.minimum(lengths.unsqueeze(1), end.unsqueeze(0)) - start.unsqueeze(0)).clamp(min=0)


def _gather_frames(x: Tensor, x_start: int, index: Tensor) -> Tensor:
    """Frames at absolute positions ``index`` (any shape) from ``x`` ``(B, n, D)`` starting at ``x_start``.

    Positions outside ``x`` give an arbitrary existing frame: callers mask them.
    """
    local = (index - x_start).clamp(0, x.shape[1] - 1)
    return x[:, local]


def _centre_mean(u: Tensor, first: Tensor, count: Tensor) -> Tensor:
    """Mean over each block's valid centre frames. ``u`` ``(B, S, W, D)``; ``first`` ``(S,)`` position of the
    centre in the block; ``count`` ``(B, S)``. Returns ``(B, S, D)`` (zeros where ``count`` is 0)."""
    w = torch.arange(u.shape[2], device=u.device)
    offset = w - first.unsqueeze(1)
    mask = (offset >= 0) & (offset < count.unsqueeze(2))
    return (u * mask.unsqueeze(3)).sum(dim=2) / count.clamp(min=1).unsqueeze(2)


def _memory_slots(keys: Tensor, before: int, n_segments: int, memory_size: int) -> tuple[Tensor, Tensor]:
    """Memory visible to each segment of a call.

    Args:
        keys: ``(B, H, before + n_segments, dh)``: memory vectors made before the call's first segment
            (``before`` of them, the last ones kept) and one per segment of the call, in order.
    Returns:
        ``(B * n_segments, H, memory_size, dh)``: for segment ``s`` the last ``memory_size`` vectors made
        before it, left-aligned, and their count ``(n_segments,)``.
    """
    s = torch.arange(n_segments, device=keys.device)
    count = (s + before).clamp(max=memory_size)
    index = (s + before - count).unsqueeze(1) + torch.arange(memory_size, device=keys.device)
    index = index.clamp(max=keys.shape[2] - 1)
    batch, heads, _, dh = keys.shape
    slots = keys[:, :, index.reshape(-1)].view(batch, heads, n_segments, memory_size, dh)
    return slots.transpose(1, 2).reshape(batch * n_segments, heads, memory_size, dh), count


def _fold(t: Tensor) -> Tensor:
    """``(B, S, ...)`` -> ``(B * S, ...)``."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _last(t: Tensor, n: int | None) -> Tensor:
    """The last ``n`` entries along dim ``-2`` (``None``: all)."""
    if n is None:
        return t
    return t[..., t.shape[-2] - min(n, t.shape[-2]):, :]


class MemoryStack(MixerStack):
    """Shared options, segment geometry and latency of the segment-based families.

    Each layer is a pre-LN :class:`Block` whose :class:`SelfAttention` provides the projections
    (``heads``/``merge``); the attention pattern is the family's own, not the band of that class.
    """

    def __init__(self, config, options: MemoryOptions):
        super().__init__()
        rights = set(config.right_frames_per_layer())
        if len(rights) != 1:
            raise ValueError(f"mixer {config.mixer!r} needs one right_frames for every layer (the right context "
                             f"is part of each segment's block), got {config.right_frames}")
        self.segment_frames = options.segment_frames
        self.memory_size = options.memory_size
        self.left_frames: int | None = config.left_frames
        self.right_frames: int = rights.pop()
        self.n_heads = config.n_heads
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.ffn_dim, config.dropout,
                  SelfAttention(config.d_model, config.n_heads, self.left_frames, self.right_frames))
            for _ in range(config.n_layers))

    def lookahead_frames(self) -> int:
        return self.segment_frames - 1 + self.right_frames

    def mean_lookahead_frames(self) -> float:
        return (self.segment_frames - 1) / 2 + self.right_frames

    def _left_start(self, segment: int) -> int:
        """First frame of segment ``segment``'s left context."""
        start = segment * self.segment_frames
        return 0 if self.left_frames is None else max(0, start - self.left_frames)

    def _starts(self, first: int, n_segments: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """First frame of the left context and of the centre of segments ``first ..``: ``(S,)`` each."""
        centres = torch.arange(first, first + n_segments, device=device) * self.segment_frames
        if self.left_frames is None:
            return torch.zeros_like(centres), centres
        return (centres - self.left_frames).clamp(min=0), centres

    def _width(self, first: int, n_segments: int) -> int:
        """Frames from the left context's start to the centre's end of the widest of segments ``first ..``."""
        last = first + n_segments - 1
        if self.left_frames is None:
            return (last + 1) * self.segment_frames
        return min(self.left_frames, last * self.segment_frames) + self.segment_frames

    def _ready(self, first: int, frames_in: int, final: bool) -> int:
        """Segments from ``first`` on whose outputs can be computed with ``frames_in`` frames known."""
        c = self.segment_frames
        if final:
            return max(0, -(-frames_in // c) - first)
        return max(0, (frames_in - self.right_frames) // c - first)

    def _empty(self, batch_size: int, frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, frames, self.blocks[0].norm1.normalized_shape[0], device=device, dtype=dtype)


class AMTRFStack(MemoryStack):
    """AM-TRF: every block ``[L left; C centre; R right]`` runs through the whole stack on its own."""

    def _blocks(self, x: Tensor, x_start: int, first: int, n_segments: int,
                lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Lay out segments ``first .. first + n_segments - 1`` as blocks.

        Args:
            x: input frames ``(B, n, D)`` whose first frame is absolute frame ``x_start``.
            lengths: ``(B,)`` frames per stream; frames at or past it do not exist.
        Returns:
            blocks ``(B, S, W, D)`` (block ``s`` left-aligned from its first context frame), valid frames per
            block ``(B, S)``, position of the centre in each block ``(S,)``, valid centre frames ``(B, S)``.
        """
        c = self.segment_frames
        starts, centres = self._starts(first, n_segments, x.device)
        ends = centres + c + self.right_frames
        width = self._width(first, n_segments) + self.right_frames
        index = starts.unsqueeze(1) + torch.arange(width, device=x.device)
        blocks = _gather_frames(x, x_start, index)
        return blocks, _counts(lengths, starts, ends), centres - starts, _counts(lengths, centres, centres + c)

    def _run(self, h: Tensor, n_valid: Tensor, centre_first: Tensor, centre_count: Tensor,
             banks: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Blocks ``(B, S, W, D)`` through every layer; ``banks[l]`` ``(B, m, D)`` is layer ``l``'s memory
        before the first block (``m <= M``). Returns the blocks' outputs and the new banks."""
        batch, n_segments, width, d_model = h.shape
        new_banks = []
        for block, bank in zip(self.blocks, banks):
            att: SelfAttention = block.mixer
            u = block.norm1(h)
            q, k, v = att.heads(_fold(u))
            parts = [(k, v, n_valid.reshape(-1))]
            if self.memory_size > 0:
                memory, mk, mv = self._memory(att, u, k, v, n_valid, centre_first, centre_count, bank)
                before = bank.shape[1]
                slots_k, count = _memory_slots(mk, before, n_segments, self.memory_size)
                slots_v, _ = _memory_slots(mv, before, n_segments, self.memory_size)
                parts.insert(0, (slots_k, slots_v, count.repeat(batch)))
                bank = _last(memory, self.memory_size)
            mixed = att.merge(_attend(q, parts)).view(batch, n_segments, width, d_model)
            h = block.residual_feed_forward(h, mixed)
            new_banks.append(bank)
        return h, new_banks

    def _memory(self, att: SelfAttention, u: Tensor, k: Tensor, v: Tensor, n_valid: Tensor,
                centre_first: Tensor, centre_count: Tensor, bank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The recurrence over segments: segment ``s``'s summary query attends to the memory made before it
        and to its block; ``tanh`` of the output joins the memory.

        Returns the bank followed by one new memory vector per segment ``(B, m + S, D)`` and their keys and
        values ``(B, H, m + S, dh)``.
        """
        batch, n_segments = u.shape[:2]
        summary_q, _, _ = att.heads(_centre_mean(u, centre_first, centre_count))
        # unbind, not indexing in the loop: the backward of k[:, s] would write a zero tensor of k's full
        # size for every segment.
        queries = summary_q.unbind(2)
        block_k = k.view(batch, n_segments, *k.shape[1:]).unbind(1)
        block_v = v.view(batch, n_segments, *v.shape[1:]).unbind(1)
        _, bank_k, bank_v = att.heads(bank)
        made = [bank]
        made_k = [bank_k[:, :, i:i + 1] for i in range(bank.shape[1])]
        made_v = [bank_v[:, :, i:i + 1] for i in range(bank.shape[1])]
        for s in range(n_segments):
            seen = min(self.memory_size, len(made_k))
            keys = torch.cat(made_k[len(made_k) - seen:] + [block_k[s]], dim=2)
            values = torch.cat(made_v[len(made_v) - seen:] + [block_v[s]], dim=2)
            out = dense_band_attention(queries[s].unsqueeze(2), [KeySource(keys, values, None, None)], 0,
                                       n_valid[:, s] + seen)
            new = torch.tanh(att.merge(out))
            _, new_k, new_v = att.heads(new)
            made.append(new)
            made_k.append(new_k)
            made_v.append(new_v)
        return torch.cat(made, dim=1), torch.cat(made_k, dim=2), torch.cat(made_v, dim=2)

    def _segments(self, x: Tensor, x_start: int, first: int, n_segments: int, lengths: Tensor,
                  banks: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Outputs ``(B, S * C, D)`` of segments ``first ..`` (frames past ``lengths`` are padding)."""
        blocks, n_valid, centre_first, centre_count = self._blocks(x, x_start, first, n_segments, lengths)
        h, banks = self._run(blocks, n_valid, centre_first, centre_count, banks)
        index = centre_first.unsqueeze(1) + torch.arange(self.segment_frames, device=x.device)
        index = index + torch.arange(n_segments, device=x.device).unsqueeze(1) * h.shape[2]
        return h.reshape(h.shape[0], -1, h.shape[3])[:, index.reshape(-1)], banks

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x`` ``(B, T, D)``, ``lengths`` ``(B,)`` -> ``(B, T, D)``."""
        n_segments = -(-x.shape[1] // self.segment_frames)
        banks = [self._empty(x.shape[0], 0, x.device, x.dtype) for _ in self.blocks]
        y, _ = self._segments(x, 0, 0, n_segments, lengths, banks)
        return y[:, :x.shape[1]]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        """``frames``: input frames from the next segment's left context on (starting at ``frames_start``);
        ``banks``: each layer's memory ``(B, <= M, D)``; ``next_segment``, ``frames_in``: counters."""
        return {"frames": self._empty(batch_size, 0, device, dtype), "frames_start": 0, "frames_in": 0,
                "next_segment": 0, "banks": [self._empty(batch_size, 0, device, dtype) for _ in self.blocks]}

    def step(self, x: Tensor, state: State, final: bool = False) -> tuple[Tensor, State]:
        frames = torch.cat([state["frames"], x], dim=1)
        frames_in, first, start = state["frames_in"] + x.shape[1], state["next_segment"], state["frames_start"]
        n_ready = self._ready(first, frames_in, final)
        if n_ready == 0:
            return frames[:, :0], {**state, "frames": frames, "frames_in": frames_in}
        lengths = torch.full((x.shape[0],), frames_in, device=x.device)
        y, banks = self._segments(frames, start, first, n_ready, lengths, state["banks"])
        y = y[:, :frames_in - first * self.segment_frames]
        keep_from = self._left_start(first + n_ready)
        return y, {"frames": frames[:, keep_from - start:], "frames_start": keep_from, "frames_in": frames_in,
                   "next_segment": first + n_ready, "banks": banks}


class EmformerStack(MemoryStack):
    """Emformer: cached left context, memory from the layer below, right-context blocks."""

    def _segments(self, x: Tensor, x_start: int, first: int, n_segments: int, lengths: Tensor,
                  layers: list[State]) -> tuple[Tensor, list[State]]:
        """Outputs ``(B, S * C, D)`` of segments ``first .. first + S - 1``, all at once.

        Args:
            x: input frames ``(B, n, D)`` from absolute frame ``x_start`` (= ``first * C``) on.
            lengths: ``(B,)`` frames per stream; frames at or past it do not exist.
            layers: per layer ``k``, ``v`` ``(B, H, <= L, dh)``: keys/values of the centre frames just
                before ``x_start``; ``bank`` ``(B, <= M, D)``: the memory this layer reads.
        """
        c, r, device = self.segment_frames, self.right_frames, x.device
        batch, d_model = x.shape[0], x.shape[2]
        segments = torch.arange(first, first + n_segments, device=device)
        centre_starts = segments * c
        centre_count = _counts(lengths, centre_starts, centre_starts + c)
        right_count = _counts(lengths, centre_starts + c, centre_starts + c + r)
        main = _gather_frames(x, x_start, torch.arange(x_start, x_start + n_segments * c, device=device))
        right = _gather_frames(x, x_start, (centre_starts + c).unsqueeze(1) + torch.arange(r, device=device))
        # Layer 0 reads the mean of each segment's input frames as its memory.
        memory = _centre_mean(main.view(batch, n_segments, c, d_model), torch.zeros_like(segments), centre_count)

        new_layers = []
        for layer, (block, cache) in enumerate(zip(self.blocks, layers)):
            att: SelfAttention = block.mixer
            last = layer == len(self.blocks) - 1
            u_main, u_right = block.norm1(main), block.norm1(right)
            q_main, k_main, v_main = att.heads(u_main)
            q_right, k_right, v_right = att.heads(_fold(u_right))
            k_cached, v_cached = cache["k"], cache["v"]

            window_k, window_v, window_count = self._windows(
                torch.cat([k_cached, k_main], dim=2), torch.cat([v_cached, v_main], dim=2),
                x_start - k_cached.shape[2], first, n_segments, lengths)
            context = [(window_k, window_v, window_count.reshape(-1)),
                       (k_right, v_right, right_count.reshape(-1))]
            parts = list(context)
            if self.memory_size > 0:
                bank = torch.cat([cache["bank"], memory], dim=1)
                _, mk, mv = att.heads(bank)
                slots_k, count = _memory_slots(mk, cache["bank"].shape[1], n_segments, self.memory_size)
                slots_v, _ = _memory_slots(mv, cache["bank"].shape[1], n_segments, self.memory_size)
                parts.insert(0, (slots_k, slots_v, count.repeat(batch)))
                if not last:
                    summary = _centre_mean(u_main.view(batch, n_segments, c, d_model), torch.zeros_like(segments),
                                           centre_count)
                    q_summary, _, _ = att.heads(_fold(summary).unsqueeze(1))
                    memory = torch.tanh(att.merge(_attend(q_summary, context))).view(batch, n_segments, d_model)
                cache = {**cache, "bank": _last(bank, self.memory_size)}

            h, dh = self.n_heads, q_main.shape[3]
            q_segments = q_main.view(batch, h, n_segments, c, dh).transpose(1, 2).reshape(-1, h, c, dh)
            out = _attend(torch.cat([q_right, q_segments], dim=2), parts)
            out_right, out_main = out[:, :, :r], out[:, :, r:]
            out_main = out_main.reshape(batch, n_segments, h, c, dh).transpose(1, 2).reshape(batch, h, -1, dh)
            main = block.residual_feed_forward(main, att.merge(out_main))
            if not last:  # the top layer's right-context blocks feed nothing
                right = block.residual_feed_forward(right, att.merge(out_right).view(batch, n_segments, r, d_model))
            new_layers.append({**cache, "k": _last(torch.cat([k_cached, k_main], dim=2), self.left_frames),
                               "v": _last(torch.cat([v_cached, v_main], dim=2), self.left_frames)})
        return main, new_layers

    def _windows(self, k: Tensor, v: Tensor, k_start: int, first: int, n_segments: int,
                 lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Left context and centre ``[iC - L, iC + C)`` of each segment, from main-sequence keys ``(B, H, n, dh)``
        whose first frame is ``k_start``. Returns ``(B * S, H, W, dh)`` twice and valid counts ``(B, S)``."""
        device = k.device
        starts, centres = self._starts(first, n_segments, device)
        ends = centres + self.segment_frames
        width = self._width(first, n_segments)
        index = (starts.unsqueeze(1) + torch.arange(width, device=device) - k_start).clamp(0, k.shape[2] - 1)
        batch, heads, _, dh = k.shape

        def take(t: Tensor) -> Tensor:
            return t[:, :, index.reshape(-1)].view(batch, heads, n_segments, width, dh).transpose(1, 2).reshape(
                batch * n_segments, heads, width, dh)

        return take(k), take(v), _counts(lengths, starts, ends)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x`` ``(B, T, D)``, ``lengths`` ``(B,)`` -> ``(B, T, D)``."""
        n_segments = -(-x.shape[1] // self.segment_frames)
        y, _ = self._segments(x, 0, 0, n_segments, lengths, self._fresh_layers(x.shape[0], x.device, x.dtype))
        return y[:, :x.shape[1]]

    def _fresh_layers(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[State]:
        d_model = self.blocks[0].norm1.normalized_shape[0]
        empty = torch.zeros(batch_size, self.n_heads, 0, d_model // self.n_heads, device=device, dtype=dtype)
        return [{"k": empty, "v": empty, "bank": self._empty(batch_size, 0, device, dtype)} for _ in self.blocks]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        """``frames``: input frames from the next segment's first frame on; ``layers``: per layer the cached
        keys/values ``(B, H, <= L, D/H)`` of its last centre frames and the memory ``bank`` ``(B, <= M, D)``
        it reads; ``next_segment``, ``frames_in``: counters."""
        return {"frames": self._empty(batch_size, 0, device, dtype), "frames_in": 0, "next_segment": 0,
                "layers": self._fresh_layers(batch_size, device, dtype)}

    def step(self, x: Tensor, state: State, final: bool = False) -> tuple[Tensor, State]:
        frames = torch.cat([state["frames"], x], dim=1)
        frames_in, first = state["frames_in"] + x.shape[1], state["next_segment"]
        n_ready = self._ready(first, frames_in, final)
        if n_ready == 0:
            return frames[:, :0], {**state, "frames": frames, "frames_in": frames_in}
        start = first * self.segment_frames
        lengths = torch.full((x.shape[0],), frames_in, device=x.device)
        y, layers = self._segments(frames, start, first, n_ready, lengths, state["layers"])
        done = n_ready * self.segment_frames
        return y[:, :frames_in - start], {"frames": frames[:, done:], "frames_in": frames_in,
                                          "next_segment": first + n_ready, "layers": layers}


@register_mixer("amtrf", options=MemoryOptions)
def build_amtrf(config) -> MixerStack:
    """AM-TRF (Wu et al., 2020): segments, recomputed left/right context, per-layer augmented memory."""
    return AMTRFStack(config, MemoryOptions(**config.mixer_options))


@register_mixer("emformer", options=MemoryOptions)
def build_emformer(config) -> MixerStack:
    """Emformer (Shi et al., 2021): cached left context, memory from the layer below, parallel training."""
    return EmformerStack(config, MemoryOptions(**config.mixer_options))
