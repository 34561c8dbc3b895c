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

Offline and streaming run the same segment code, one ``_segments`` per family: it computes segments
``first .. first + S - 1`` of every stream (``first`` per stream) from a window of input frames and the
caches left by earlier segments (memory banks; Emformer's left-context keys), and returns the caches
extended by these segments. There is one masking scheme: a key is hidden by its absolute position
(before the stream's start, outside its segment's context, at or past the frames that exist), a memory
slot when no segment of the stream filled it (a fresh state's zeros). ``forward`` calls it once for all
segments from a fresh state, with the lengths as the frames that exist, so a short last segment sees
exactly what the streaming form sees at the end of a stream; ``step`` calls it on the segments a chunk
can complete and keeps from the extended caches what the next step needs.

``left_frames=None`` means unlimited left context: AM-TRF then recomputes the whole past in every block
(cost quadratic in T), Emformer caches every past key (state grows with the stream). ``right_frames``
must be one value for every layer: it is the right context of a segment's block, not a per-layer band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from streamssl.mixers.attention import SelfAttention
from streamssl.mixers.attention_core import KeySource, biased_attention, dense_band_attention, visible_bias
from streamssl.mixers.base import Block, MixerStack, register_mixer
from streamssl.mixers.window import Chunk, keep_last, push, streaming_state, take_index


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


def _gather(frames: Tensor, index: Tensor) -> Tensor:
    """``frames[b, index[b, ...]]``: ``(B, ..., D)`` from ``frames`` ``(B, W, D)`` and ``index`` ``(B, ...)``.

    Indices outside ``[0, W)`` are clamped into it: callers mask those frames.
    """
    batch, width, d_model = frames.shape
    flat = index.reshape(batch, -1, 1).clamp(0, width - 1).expand(-1, -1, d_model)
    return torch.gather(frames, 1, flat).view(*index.shape, d_model)


def _masked_mean(u: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``u`` ``(B, S, W, D)`` over the frames where ``mask`` ``(B, S, W)``: ``(B, S, D)``, zeros where none."""
    weights = mask.unsqueeze(3).to(u.dtype)
    return (u * weights).sum(dim=2) / weights.sum(dim=2).clamp(min=1)


def _fold(t: Tensor) -> Tensor:
    """``(B, S, ...)`` -> ``(B * S, ...)``."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _per_segment(t: Tensor, slots: Tensor) -> Tensor:
    """What each segment reads of ``t`` ``(B, H, N, x)``: ``(B * S, H, W, x)``, segment ``s`` reading the
    entries ``slots[s]`` of ``slots`` ``(S, W)``."""
    batch, heads, _, features = t.shape
    n_segments, width = slots.shape
    picked = t.index_select(2, slots.reshape(-1)).view(batch, heads, n_segments, width, features)
    return picked.transpose(1, 2).reshape(batch * n_segments, heads, width, features)


class MemoryStack(MixerStack):
    """Shared options, segment geometry, memory layout and latency of the segment-based families.

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

    def _frames_kept(self) -> int | None:
        """Input frames a state keeps: the frames of the next segment and its right context that already
        arrived, after the segment's left context where the family recomputes it (``None``: all)."""
        return self.segment_frames - 1 + self.right_frames

    def _output_valid(self, chunk: Chunk, next_segment: Tensor, ready: Tensor, slots: int) -> Tensor:
        """``(B, S * C)``: the centre frames of the ready segments that exist."""
        c = self.segment_frames
        offset = torch.arange(slots * c, device=ready.device)
        pos = next_segment.view(-1, 1) * c + offset
        return (offset < (ready * c).view(-1, 1)) & (pos < chunk.valid_end.view(-1, 1))

    def _memory_layout(self, segments: Tensor) -> tuple[Tensor, Tensor]:
        """Where the memory of each segment ``segments`` ``(B, S)`` lies among a layer's bank (``M`` vectors,
        newest last) followed by the vectors the call's segments make: slots ``(S, M)``, and which of them a
        segment of the stream made ``(B * S, M)`` (the others are the fresh state's zeros)."""
        m, device = self.memory_size, segments.device
        n_segments = segments.shape[1]
        slots = torch.arange(n_segments, device=device).view(-1, 1) + torch.arange(m, device=device)
        valid = segments.unsqueeze(2) - m + torch.arange(m, device=device) >= 0
        return slots, _fold(valid)

    def _kept_banks(self, banks: list[Tensor], ready: Tensor) -> list[Tensor]:
        """Per layer the ``M`` vectors ``(B, M, D)`` of its extended bank ``(B, M + S, D)`` that the segment
        after the ``ready`` ``(B,)`` ones reads."""
        if self.memory_size == 0:  # empty banks: ONNX cannot export a gather of nothing
            return banks
        kept = take_index(banks[0], ready, self.memory_size)
        return [bank.gather(1, kept) for bank in banks]

    def _empty(self, batch_size: int, frames: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch_size, frames, self.blocks[0].norm1.normalized_shape[0], device=device, dtype=dtype)

    def _window(self, x: Tensor, chunk: Chunk, frames: Tensor,
                next_segment: Tensor) -> tuple[Tensor, Tensor, int, Tensor]:
        """A step's input window ``(B, W, D)`` (the kept ``frames`` then ``x``) and the absolute frame of its
        first slot ``(B,)``; the step's segment slots ``S``, as many as ``n`` frames can complete whatever
        the stream's position; and how many of them are ready ``(B,)``: frames and right context all known."""
        c = self.segment_frames
        window = push(frames, x, chunk.count)
        slots = (x.shape[1] + c - 1) // c
        done = torch.div(chunk.end - self.right_frames, c, rounding_mode="floor")
        return window, chunk.end - window.shape[1], slots, (done - next_segment).clamp(0, slots)


class AMTRFStack(MemoryStack):
    """AM-TRF: every block ``[L left; C centre; R right]`` runs through the whole stack on its own."""

    def _segments(self, window: Tensor, window_start: Tensor, first: Tensor, n_segments: int, valid_end: Tensor,
                  banks: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Outputs ``(B, S * C, D)`` of every stream's segments ``first .. first + S - 1``.

        Args:
            window: input frames ``(B, W, D)``, slot ``i`` at absolute frame ``window_start + i`` (``(B,)``);
                it holds every existing frame of the segments' blocks.
            first: ``(B,)`` each stream's first segment of the call.
            valid_end: ``(B,)`` frames that exist; frames at or past it are masked.
            banks: per layer the ``M`` memory vectors ``(B, M, D)`` made before segment ``first``, newest last.
        Returns:
            The outputs and per layer its bank followed by the vectors the segments made ``(B, M + S, D)``
            (with ``M = 0``, the empty bank).
        """
        c, r, left = self.segment_frames, self.right_frames, self.left_frames
        batch, d_model, device = window.shape[0], window.shape[2], window.device
        segments = first.view(-1, 1) + torch.arange(n_segments, device=device)      # (B, S)
        centres = segments * c
        if left is None:  # every block starts at the stream's first frame that the window holds
            starts, width = window_start.view(-1, 1).expand(-1, n_segments), window.shape[1]
        else:
            starts, width = centres - left, left + c + r
        pos = starts.unsqueeze(2) + torch.arange(width, device=device)               # (B, S, W)
        ends = torch.minimum(centres + c + r, valid_end.view(-1, 1)).unsqueeze(2)
        valid = (pos >= 0) & (pos < ends)
        in_centre = valid & (pos >= centres.unsqueeze(2)) & (pos < centres.unsqueeze(2) + c)
        h = _gather(window, pos - window_start.view(-1, 1, 1))
        block_valid = _fold(valid)
        memory_slots, memory_valid = self._memory_layout(segments)
        new_banks = []
        for block, bank in zip(self.blocks, banks):
            att: SelfAttention = block.mixer
            u = block.norm1(h)
            q, k, v = att.heads(_fold(u))
            sources = [KeySource(k, v, None, None, 0, block_valid)]
            if self.memory_size > 0:
                summary_q, _, _ = att.heads(_masked_mean(u, in_centre))
                bank, memory_k, memory_v = self._memory(att, summary_q, k, v, valid, bank, memory_valid)
                sources.insert(0, KeySource(_per_segment(memory_k, memory_slots), _per_segment(memory_v, memory_slots),
                                            None, None, 0, memory_valid))
                # A summary reads what its block's frames read, so it joins them as the block's last query;
                # the last segment's, which the recurrence leaves out, is taken from there.
                q = torch.cat([q, _fold(summary_q.transpose(1, 2)).unsqueeze(2)], dim=2)
            mixed = att.merge(dense_band_attention(q, sources)).view(batch, n_segments, -1, d_model)
            if self.memory_size > 0:
                bank = torch.cat([bank, torch.tanh(mixed[:, -1:, width])], dim=1)
            h = block.residual_feed_forward(h, mixed[:, :, :width])
            new_banks.append(bank)
        # Only the centre frames' outputs are kept.
        centre = (torch.arange(n_segments, device=device) * width + centres - starts).unsqueeze(2)
        return _gather(h.reshape(batch, n_segments * width, d_model), centre + torch.arange(c, device=device)).view(
            batch, n_segments * c, d_model), new_banks

    def _memory(self, att: SelfAttention, summary_q: Tensor, k: Tensor, v: Tensor, valid: Tensor, bank: Tensor,
                memory_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The recurrence over segments: segment ``s``'s summary query attends to the memory made before it
        and to its block; ``tanh`` of the output joins the memory.

        Args:
            summary_q: ``(B, H, S, dh)`` the segments' summary queries.
            k, v: ``(B * S, H, W, dh)`` the blocks' keys/values; ``valid``: ``(B, S, W)`` the frames that exist.
            bank: ``(B, M, D)`` the memory before the first segment, newest last.
            memory_valid: ``(B * S, M)`` which of the ``M`` vectors before each segment exist.
        Returns:
            The bank followed by the vectors of every segment but the last ``(B, M + S - 1, D)``, and their
            keys and values ``(B, H, M + S - 1, dh)``.
        """
        batch, n_segments = valid.shape[:2]
        m = self.memory_size
        # unbind, not indexing in the loop: the backward of k[:, s] would write a zero tensor of k's full
        # size for every segment.
        queries = summary_q.unbind(2)
        block_k = k.view(batch, n_segments, *k.shape[1:]).unbind(1)
        block_v = v.view(batch, n_segments, *v.shape[1:]).unbind(1)
        seen_valid = torch.cat([memory_valid.view(batch, n_segments, m), valid], dim=2).unbind(1)
        _, bank_k, bank_v = att.heads(bank)
        made, made_k, made_v = [bank], list(bank_k.split(1, dim=2)), list(bank_v.split(1, dim=2))
        for s in range(n_segments - 1):
            keys = torch.cat(made_k[-m:] + [block_k[s]], dim=2)
            values = torch.cat(made_v[-m:] + [block_v[s]], dim=2)
            out = dense_band_attention(queries[s].unsqueeze(2), [KeySource(keys, values, None, None, 0, seen_valid[s])])
            made.append(torch.tanh(att.merge(out)))
            _, new_k, new_v = att.heads(made[-1])
            made_k.append(new_k)
            made_v.append(new_v)
        return torch.cat(made, dim=1), torch.cat(made_k, dim=2), torch.cat(made_v, dim=2)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x`` ``(B, T, D)``, ``lengths`` ``(B,)`` -> ``(B, T, D)``."""
        state = self.init_state(x.shape[0], x.device, x.dtype)
        n_segments = -(-x.shape[1] // self.segment_frames)
        y, _ = self._segments(x, state.next_segment, state.next_segment, n_segments, lengths, state.banks)
        return y[:, :x.shape[1]]

    def _frames_kept(self) -> int | None:
        if self.left_frames is None:
            return None
        return self.left_frames + super()._frames_kept()

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> "AMTRFState":
        zeros = [self._empty(batch_size, self.memory_size, device, dtype) for _ in self.blocks]
        return AMTRFState(self._empty(batch_size, self._frames_kept() or 0, device, dtype),
                          torch.zeros(batch_size, dtype=torch.long, device=device), zeros)

    def step(self, x: Tensor, chunk: Chunk, state: "AMTRFState") -> tuple[Tensor, Tensor, "AMTRFState"]:
        """Every segment the chunk can complete, as in the offline form; the ready ones are kept."""
        if x.shape[1] == 0:
            return x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), state
        window, window_start, slots, ready = self._window(x, chunk, state.frames, state.next_segment)
        y, banks = self._segments(window, window_start, state.next_segment, slots, chunk.valid_end, state.banks)
        new_state = AMTRFState(keep_last(window, self._frames_kept()), state.next_segment + ready,
                               self._kept_banks(banks, ready))
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

    def _segments(self, window: Tensor, window_start: Tensor, first: Tensor, n_segments: int, valid_end: Tensor,
                  kv: list[Tensor], banks: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Outputs ``(B, S * C, D)`` of every stream's segments ``first .. first + S - 1``, all at once.

        Args:
            window: input frames ``(B, W, D)``, slot ``i`` at absolute frame ``window_start + i`` (``(B,)``);
                it holds every existing frame of the segments and of their right context.
            first: ``(B,)`` each stream's first segment of the call.
            valid_end: ``(B,)`` frames that exist; frames at or past it are masked.
            kv: per layer the keys and values ``(B, H, K, 2 dh)`` of the ``K`` centre frames before segment
                ``first`` (slot ``j`` at frame ``first * C - K + j``).
            banks: per layer the ``M`` memory vectors ``(B, M, D)`` it reads before segment ``first``, newest last.
        Returns:
            The outputs; per layer ``kv`` followed by the segments' centre frames ``(B, H, K + S * C, 2 dh)``;
            per layer its bank followed by the vectors the segments made for it ``(B, M + S, D)`` (with
            ``M = 0``, the empty bank).
        """
        c, r, m = self.segment_frames, self.right_frames, self.memory_size
        batch, d_model, device = window.shape[0], window.shape[2], window.device
        segments = first.view(-1, 1) + torch.arange(n_segments, device=device)       # (B, S)
        centre_pos = segments.unsqueeze(2) * c + torch.arange(c, device=device)       # (B, S, C)
        right_pos = (segments.unsqueeze(2) + 1) * c + torch.arange(r, device=device)  # (B, S, R)
        start = window_start.view(-1, 1, 1)
        main = _gather(window, centre_pos - start).view(batch, n_segments * c, d_model)
        right = _gather(window, right_pos - start)
        centre_valid = centre_pos < valid_end.view(-1, 1, 1)
        right_valid = _fold(right_pos < valid_end.view(-1, 1, 1))
        # Layer 0 reads the mean of each segment's input frames as its memory.
        memory = _masked_mean(main.view(batch, n_segments, c, d_model), centre_valid)
        context_slots, context_valid = self._context_layout(first, n_segments, kv[0].shape[2], valid_end)
        memory_slots, memory_valid = self._memory_layout(segments)
        heads = self.n_heads
        dh = d_model // heads
        n_main, n_right = n_segments * c, n_segments * r
        biases = {summarise: self._segment_bias(memory_valid if m > 0 else None, context_valid, right_valid, r, c,
                                                summarise, main.dtype) for summarise in {m > 0, False}}
        new_kv, new_banks = [], []
        for layer, (block, kv_cached, bank) in enumerate(zip(self.blocks, kv, banks)):
            att: SelfAttention = block.mixer
            last = layer == len(self.blocks) - 1
            summarise = m > 0 and not last
            # Every row this layer projects goes through one qkv product, the right-context blocks and
            # the summaries beside the centre frames and the memory vectors (reading the weights once is
            # what a small step costs); the summary rows are read only for q, the memory rows for k, v.
            u = block.norm1(torch.cat([main, right.view(batch, n_right, d_model)], dim=1))
            rows = [u]
            if summarise:
                rows.append(_masked_mean(u[:, :n_main].view(batch, n_segments, c, d_model), centre_valid))
            if m > 0:
                bank = torch.cat([bank, memory], dim=1)
                rows.append(bank[:, :-1])  # the newest vector is read only by later calls
            qkv = att.qkv(torch.cat(rows, dim=1) if len(rows) > 1 else u).view(batch, -1, 3, heads, dh)
            n_rows = n_main + n_right
            kv_main = qkv[:, :n_main, 1:].permute(0, 3, 1, 2, 4).reshape(batch, heads, n_main, 2 * dh)
            kv_layer = torch.cat([kv_cached, kv_main], dim=2)
            # Per segment: queries [right context R; centre C; summary], keys [memory M; left context and
            # centre W; right context R].
            q_main = qkv[:, :n_main, 0].reshape(batch, n_segments, c, heads, dh)
            q_right = qkv[:, n_main:n_rows, 0].reshape(batch, n_segments, r, heads, dh)
            queries = [q_right, q_main]
            keys = [_per_segment(kv_layer, context_slots),
                    _fold(qkv[:, n_main:n_rows, 1:].reshape(batch, n_segments, r, 2, heads, dh)
                          .permute(0, 1, 4, 2, 3, 5).reshape(batch, n_segments, heads, r, 2 * dh))]
            if summarise:
                queries.append(qkv[:, n_rows:n_rows + n_segments, 0].reshape(batch, n_segments, 1, heads, dh))
            if m > 0:
                memory_kv = qkv[:, -(m + n_segments - 1):, 1:].permute(0, 3, 1, 2, 4).reshape(batch, heads, -1, 2 * dh)
                keys.insert(0, _per_segment(memory_kv, memory_slots))
            q = _fold(torch.cat(queries, dim=2)).transpose(1, 2)                  # (B * S, H, R + C [+ 1], dh)
            k_all = torch.cat(keys, dim=2)
            bias = biases[summarise]
            mixed = att.merge(biased_attention(q, k_all[..., :dh], k_all[..., dh:], bias))  # (B * S, R + C [+ 1], D)
            mixed_main = mixed[:, r:r + c].reshape(batch, n_main, d_model)
            if summarise:
                memory = torch.tanh(mixed[:, r + c]).view(batch, n_segments, d_model)
            if last:  # the top layer's right-context blocks feed nothing
                main = block.residual_feed_forward(main, mixed_main)
            else:
                mixed_right = mixed[:, :r].reshape(batch, n_right, d_model)
                both = block.residual_feed_forward(torch.cat([main, right.view(batch, n_right, d_model)], dim=1),
                                                   torch.cat([mixed_main, mixed_right], dim=1))
                main, right = both[:, :n_main], both[:, n_main:].view(batch, n_segments, r, d_model)
            new_kv.append(kv_layer)
            new_banks.append(bank)
        return main, new_kv, new_banks

    @staticmethod
    def _segment_bias(memory_valid: Tensor | None, context_valid: Tensor, right_valid: Tensor, r: int, c: int,
                      summary: bool, dtype: torch.dtype) -> Tensor:
        """``(B * S, 1, R + C [+ 1], M + W + R)``: the keys each query of a segment sees, as an attention
        bias. Every query sees the keys that exist, except that the summary does not attend to memory."""
        parts = [context_valid, right_valid] if memory_valid is None else [memory_valid, context_valid, right_valid]
        valid = torch.cat(parts, dim=1).unsqueeze(1)                                 # (B * S, 1, K)
        if summary and memory_valid is not None:
            summary_row = torch.arange(r + c + 1, device=valid.device).view(-1, 1) == r + c
            memory_key = torch.arange(valid.shape[2], device=valid.device) < memory_valid.shape[1]
            valid = valid & ~(summary_row & memory_key)
        return visible_bias(valid, dtype).unsqueeze(1)

    def _context_layout(self, first: Tensor, n_segments: int, cached: int, valid_end: Tensor) -> tuple[Tensor, Tensor]:
        """Where each segment's left context and centre lie among a layer's main-sequence keys (the ``cached``
        ones before segment ``first``, then the call's ``S * C``): slots ``(S, W)``, and which of them hold
        frames that exist ``(B * S, W)``."""
        c, left, device = self.segment_frames, self.left_frames, first.device
        if left is None:  # every key so far
            total = cached + n_segments * c
            slots = torch.arange(total, device=device).expand(n_segments, total)
        else:  # the cache holds exactly the L frames before the first segment
            slots = torch.arange(n_segments, device=device).view(-1, 1) * c + torch.arange(left + c, device=device)
        pos = (first * c - cached).view(-1, 1, 1) + slots                              # (B, S, W)
        ends = (first.view(-1, 1) + torch.arange(1, n_segments + 1, device=device)) * c
        return slots, _fold((pos >= 0) & (pos < torch.minimum(ends, valid_end.view(-1, 1)).unsqueeze(2)))

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """``x`` ``(B, T, D)``, ``lengths`` ``(B,)`` -> ``(B, T, D)``."""
        state = self.init_state(x.shape[0], x.device, x.dtype)
        n_segments = -(-x.shape[1] // self.segment_frames)
        y, _, _ = self._segments(x, state.next_segment, state.next_segment, n_segments, lengths, state.kv,
                                 state.banks)
        return y[:, :x.shape[1]]

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> "EmformerState":
        d_model = self.blocks[0].norm1.normalized_shape[0]
        left = 0 if self.left_frames is None else self.left_frames
        kv = [torch.zeros(batch_size, self.n_heads, left, 2 * d_model // self.n_heads, device=device, dtype=dtype)
              for _ in self.blocks]
        banks = [self._empty(batch_size, self.memory_size, device, dtype) for _ in self.blocks]
        return EmformerState(self._empty(batch_size, self._frames_kept(), device, dtype),
                             torch.zeros(batch_size, dtype=torch.long, device=device), kv, banks)

    def step(self, x: Tensor, chunk: Chunk, state: "EmformerState") -> tuple[Tensor, Tensor, "EmformerState"]:
        """Every segment the chunk can complete at once, as in the offline form; the ready ones are kept."""
        c = self.segment_frames
        if x.shape[1] == 0:
            return x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), state
        window, window_start, slots, ready = self._window(x, chunk, state.frames, state.next_segment)
        y, kv, banks = self._segments(window, window_start, state.next_segment, slots, chunk.valid_end, state.kv,
                                      state.banks)
        # Right-aligned at the next segment's first frame (an unlimited cache grows by S * C slots,
        # whose oldest then hold positions before the stream's start).
        cached = state.kv[0].shape[2]
        keep = cached if self.left_frames is not None else cached + slots * c
        kept = take_index(kv[0], ready * c + cached - keep, keep, dim=2)
        new_state = EmformerState(keep_last(window, self._frames_kept()), state.next_segment + ready,
                                  [t.gather(2, kept) for t in kv], self._kept_banks(banks, ready))
        return y, self._output_valid(chunk, state.next_segment, ready, slots), new_state


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
