"""Augmented-memory attention (docs/methods.md section 3): AM-TRF ``amtrf`` and Emformer ``emformer``.

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
from streamssl.mixers.base import Block, MixerStack, register_mixer
from streamssl.mixers.window import Chunk, keep_last, positions, push, streaming_state, take

Layers = list[dict[str, Tensor]]


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

    def _frames_kept(self) -> int | None:
        """Input frames a state keeps: the frames of the next segment and its right context that already
        arrived, after the segment's left context where the family recomputes it (``None``: all)."""
        return self.segment_frames - 1 + self.right_frames

    def _slots(self, n: int) -> int:
        """Segments that can complete in one step of ``n`` frames, whatever the stream's position."""
        return (n + self.segment_frames - 1) // self.segment_frames

    def _n_ready(self, chunk: Chunk, next_segment: Tensor, slots: int) -> Tensor:
        """``(B,)`` segments from ``next_segment`` on whose frames and right context are all known."""
        done = torch.div(chunk.end - self.right_frames, self.segment_frames, rounding_mode="floor")
        return (done - next_segment).clamp(0, slots)

    def _output_valid(self, chunk: Chunk, next_segment: Tensor, ready: Tensor, slots: int) -> Tensor:
        """``(B, S * C)``: the centre frames of the ready segments that exist."""
        c = self.segment_frames
        offset = torch.arange(slots * c, device=ready.device)
        pos = next_segment.view(-1, 1) * c + offset
        return (offset < (ready * c).view(-1, 1)) & (pos < chunk.valid_end.view(-1, 1))

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

    def _frames_kept(self) -> int | None:
        if self.left_frames is None:
            return None
        return self.left_frames + super()._frames_kept()

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> "AMTRFState":
        d_model = self.blocks[0].norm1.normalized_shape[0]
        zeros = [torch.zeros(batch_size, self.memory_size, d_model, device=device, dtype=dtype) for _ in self.blocks]
        return AMTRFState(self._empty(batch_size, self._frames_kept() or 0, device, dtype),
                          torch.zeros(batch_size, dtype=torch.long, device=device), zeros)

    def step(self, x: Tensor, chunk: Chunk, state: "AMTRFState") -> tuple[Tensor, Tensor, "AMTRFState"]:
        """Each ready segment's block ``[L; C; R]`` runs through the whole stack, one segment after the
        other (every stream's segment ``k`` of this call at once), with each layer's memory bank."""
        c, r, left = self.segment_frames, self.right_frames, self.left_frames
        if x.shape[1] == 0:
            return x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), state
        window = push(state.frames, x, chunk.count)
        width = window.shape[1]
        slots = self._slots(x.shape[1])
        ready = self._n_ready(chunk, state.next_segment, slots)
        banks, outputs = list(state.banks), []
        for k in range(slots):
            segment = state.next_segment + k
            centre = segment * c
            if left is None:
                block, first = window, chunk.end - width
            else:
                first = centre - left
                block = take(window, first - (chunk.end - width), left + c + r)
            pos = first.view(-1, 1) + torch.arange(block.shape[1], device=x.device)
            lo = torch.zeros_like(centre) if left is None else (centre - left).clamp(min=0)
            valid = (pos >= lo.view(-1, 1)) & (pos < torch.minimum(centre + c + r, chunk.valid_end).view(-1, 1))
            in_centre = (pos >= centre.view(-1, 1)) & (pos < centre.view(-1, 1) + c) & valid
            bank_valid = torch.arange(self.memory_size, device=x.device) >= (self.memory_size - segment).view(-1, 1)
            h = block
            for layer, blk in enumerate(self.blocks):
                att: SelfAttention = blk.mixer
                u = blk.norm1(h)
                q, keys, values = att.heads(u)
                sources = [KeySource(keys, values, None, None, 0, valid)]
                if self.memory_size > 0:
                    _, mk, mv = att.heads(banks[layer])
                    sources.insert(0, KeySource(mk, mv, None, None, 0, bank_valid))
                    weights = in_centre.unsqueeze(-1).to(u.dtype)
                    summary = (u * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
                    new = torch.tanh(att.merge(dense_band_attention(att.heads(summary)[0], sources)))
                    appended = torch.cat([banks[layer][:, 1:], new], dim=1)
                    banks[layer] = torch.where((k < ready).view(-1, 1, 1), appended, banks[layer])
                h = blk.residual_feed_forward(h, att.merge(dense_band_attention(q, sources)))
            outputs.append(take(h, centre - first, c))
        y = torch.cat(outputs, dim=1) if outputs else x[:, :0]
        new_state = AMTRFState(keep_last(window, self._frames_kept()), state.next_segment + ready, banks)
        return y, self._output_valid(chunk, state.next_segment, ready, slots), new_state


@streaming_state
class AMTRFState:
    """``frames`` ``(B, L + C - 1 + R, D)``: the latest input frames (every frame so far when ``L`` is
    None); ``next_segment`` ``(B,)``; ``banks``: per layer its memory ``(B, M, D)``, newest last (slots
    before the stream's first segment are masked)."""

    frames: Tensor
    next_segment: Tensor
    banks: list[Tensor]


class EmformerStack(MemoryStack):
    """Emformer: cached left context, memory from the layer below, right-context blocks."""

    def _segments(self, x: Tensor, x_start: int, first: int, n_segments: int, lengths: Tensor,
                  layers: Layers) -> tuple[Tensor, Layers]:
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

    def _fresh_layers(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Layers:
        d_model = self.blocks[0].norm1.normalized_shape[0]
        empty = torch.zeros(batch_size, self.n_heads, 0, d_model // self.n_heads, device=device, dtype=dtype)
        return [{"k": empty, "v": empty, "bank": self._empty(batch_size, 0, device, dtype)} for _ in self.blocks]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> "EmformerState":
        d_model = self.blocks[0].norm1.normalized_shape[0]
        left = 0 if self.left_frames is None else self.left_frames
        kv = [torch.zeros(batch_size, self.n_heads, left, 2 * d_model // self.n_heads, device=device, dtype=dtype)
              for _ in self.blocks]
        banks = [torch.zeros(batch_size, self.memory_size, d_model, device=device, dtype=dtype) for _ in self.blocks]
        return EmformerState(self._empty(batch_size, self._frames_kept(), device, dtype),
                             torch.zeros(batch_size, dtype=torch.long, device=device), kv, banks)

    def step(self, x: Tensor, chunk: Chunk, state: "EmformerState") -> tuple[Tensor, Tensor, "EmformerState"]:
        """Every ready segment at once, as in the training form, from per-stream segment indices."""
        c, r, m = self.segment_frames, self.right_frames, self.memory_size
        if x.shape[1] == 0:
            return x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), state
        window = push(state.frames, x, chunk.count)
        slots = self._slots(x.shape[1])
        seg = state.next_segment
        ready = self._n_ready(chunk, seg, slots)
        batch, d_model, device = x.shape[0], x.shape[2], x.device
        first = seg * c - (chunk.end - window.shape[1])
        main = take(window, first, slots * c)
        k_index = torch.arange(slots, device=device)
        segments = seg.view(-1, 1) + k_index                                   # (B, S)
        main_pos = seg.view(-1, 1) * c + torch.arange(slots * c, device=device)
        main_valid = main_pos < chunk.valid_end.view(-1, 1)
        centre_count = main_valid.view(batch, slots, c).sum(-1)
        right_index = (first.view(-1, 1, 1) + c * (k_index.view(1, -1, 1) + 1)
                       + torch.arange(r, device=device).view(1, 1, -1)).clamp(0, window.shape[1] - 1)
        right = torch.gather(window, 1, right_index.view(batch, slots * r, 1).expand(batch, slots * r, d_model))
        right = right.view(batch, slots, r, d_model)
        right_pos = (segments.unsqueeze(-1) + 1) * c + torch.arange(r, device=device)
        right_valid = (right_pos < chunk.valid_end.view(-1, 1, 1)).reshape(batch * slots, r)
        zeros = torch.zeros_like(seg)
        memory = _centre_mean(main.view(batch, slots, c, d_model), zeros[:1].expand(slots), centre_count)
        new_kv, new_banks = [], []
        for layer, (block, kv_cached, bank) in enumerate(zip(self.blocks, state.kv, state.banks)):
            att: SelfAttention = block.mixer
            last = layer == len(self.blocks) - 1
            u_main, u_right = block.norm1(main), block.norm1(right)
            q_main, k_main, v_main = att.heads(u_main)
            q_right, k_right, v_right = att.heads(_fold(u_right))
            dh = q_main.shape[-1]
            kv = torch.cat([kv_cached, torch.cat([k_main, v_main], dim=-1)], dim=2)
            window_kv, window_valid = self._segment_windows(kv, kv_cached.shape[2], seg, slots, chunk)
            context = [KeySource(window_kv[..., :dh], window_kv[..., dh:], None, None, 0, window_valid),
                       KeySource(k_right, v_right, None, None, 0, right_valid)]
            sources = list(context)
            if m > 0:
                made = torch.cat([bank, memory], dim=1)                          # (B, M + S, D)
                _, mk, mv = att.heads(made)
                slot_index = k_index.view(-1, 1) + torch.arange(m, device=device)   # (S, M)
                slot_valid = (segments.unsqueeze(-1) - m + torch.arange(m, device=device)) >= 0
                mk = mk[:, :, slot_index].transpose(1, 2).reshape(batch * slots, self.n_heads, m, dh)
                mv = mv[:, :, slot_index].transpose(1, 2).reshape(batch * slots, self.n_heads, m, dh)
                sources.insert(0, KeySource(mk, mv, None, None, 0, slot_valid.reshape(batch * slots, m)))
                if not last:
                    summary = _centre_mean(u_main.view(batch, slots, c, d_model), zeros[:1].expand(slots),
                                           centre_count)
                    q_summary, _, _ = att.heads(_fold(summary).unsqueeze(1))
                    memory = torch.tanh(att.merge(dense_band_attention(q_summary, context))).view(
                        batch, slots, d_model)
                bank = take(made, ready, m)
            h, dh = self.n_heads, q_main.shape[3]
            q_segments = q_main.view(batch, h, slots, c, dh).transpose(1, 2).reshape(-1, h, c, dh)
            out = dense_band_attention(torch.cat([q_right, q_segments], dim=2), sources)
            out_right, out_main = out[:, :, :r], out[:, :, r:]
            out_main = out_main.reshape(batch, slots, h, c, dh).transpose(1, 2).reshape(batch, h, -1, dh)
            main = block.residual_feed_forward(main, att.merge(out_main))
            if not last:
                right = block.residual_feed_forward(right, att.merge(out_right).view(batch, slots, r, d_model))
            # Right-aligned at the next segment's first frame (an unlimited cache grows by S * C slots,
            # whose oldest then hold positions before the stream's start).
            keep = kv_cached.shape[2] if self.left_frames is not None else kv.shape[2]
            new_kv.append(take(kv, ready * c + kv_cached.shape[2] - keep, keep, dim=2))
            new_banks.append(bank)
        new_state = EmformerState(keep_last(window, self._frames_kept()), seg + ready, new_kv, new_banks)
        return main, self._output_valid(chunk, seg, ready, slots), new_state

    def _segment_windows(self, kv: Tensor, cached: int, seg: Tensor, slots: int,
                         chunk: Chunk) -> tuple[Tensor, Tensor]:
        """Left context and centre of each segment: ``(B * S, H, W, 2 dh)`` and validity ``(B * S, W)``.

        ``kv`` ``(B, H, cached + S * C, 2 dh)``: the cached keys then this call's centre frames, slot ``i``
        at position ``seg * C - cached + i``.
        """
        c, left = self.segment_frames, self.left_frames
        batch, heads, total, width2 = kv.shape
        if left is not None:
            offsets = torch.arange(slots, device=kv.device).view(-1, 1) * c + torch.arange(left + c, device=kv.device)
            windows = kv.index_select(2, offsets.reshape(-1)).view(batch, heads, slots, left + c, width2)
            windows = windows.transpose(1, 2).reshape(batch * slots, heads, left + c, width2)
        else:
            windows = kv.unsqueeze(1).expand(batch, slots, heads, total, width2).reshape(
                batch * slots, heads, total, width2)
            offsets = torch.arange(total, device=kv.device).expand(slots, total)
        pos = (seg * c - cached).view(-1, 1, 1) + offsets                          # (B, S, W)
        centre = (seg.view(-1, 1) + torch.arange(slots, device=kv.device)) * c     # (B, S)
        valid = (pos >= 0) & (pos < (centre + c).unsqueeze(-1)) & (pos < chunk.valid_end.view(-1, 1, 1))
        if left is not None:
            valid = valid & (pos >= (centre - left).unsqueeze(-1))
        return windows, valid.reshape(batch * slots, -1)


@streaming_state
class EmformerState:
    """``frames`` ``(B, C - 1 + R, D)``: the latest input frames; ``next_segment`` ``(B,)``; per layer the
    keys and values ``kv`` ``(B, H, L, 2 D/H)`` of the ``L`` centre frames before the next segment (all
    of them when ``L`` is None) and the memory ``bank`` ``(B, M, D)`` it reads, newest last."""

    frames: Tensor
    next_segment: Tensor
    kv: list[Tensor]
    banks: list[Tensor]


@register_mixer("amtrf", options=MemoryOptions)
def build_amtrf(config) -> MixerStack:
    """AM-TRF (Wu et al., 2020): segments, recomputed left/right context, per-layer augmented memory."""
    return AMTRFStack(config, MemoryOptions(**config.mixer_options))


@register_mixer("emformer", options=MemoryOptions)
def build_emformer(config) -> MixerStack:
    """Emformer (Shi et al., 2021): cached left context, memory from the layer below, parallel training."""
    return EmformerStack(config, MemoryOptions(**config.mixer_options))
