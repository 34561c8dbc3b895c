"""SummaryMixing ``summary`` and Windowed SummaryMixing ``wsm`` (docs/methods.md section 4): linear-time mixers.

Every output frame combines a per-frame projection with averages of per-frame projections::

    h_t = c([f(x_t); l_t^1; ...; l_t^k; s_t])

* ``f``, ``s``, ``s_l``: per-frame MLPs (Linear + GELU); ``c``: a Linear + GELU combiner.
* ``s_t``, the summary: the mean of ``s(x)`` over the utterance's valid frames (``"global"``, offline
  only) or over the frames seen so far, ``[t - left_frames, t]`` (``"causal"``, streamable).
* ``l_t^i`` (``wsm`` only): the mean of ``s_l(x)`` over the window ``[t - w_left_i, t + w_right_i]``.
  One ``s_l`` is shared by all windows, so a single prefix sum serves them all.

Means are differences of prefix sums, so a layer costs O(T) time and memory, never a ``T x T`` tensor.
Prefix sums are accumulated in float64 whatever the model's dtype: a float32 cumulative sum over a
1-hour stream (180 000 frames) grows to ~1e5 times a frame's value, and the difference of two such
sums over a short window would lose about three of float32's seven digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.mixers.base import MIXERS, Block, LayerMixer, LayerStack, MixerStack, register_mixer
from streamssl.mixers.window import Chunk, key_mask, keep_last, push, streaming_state

SUMMARY_KINDS = ("causal", "global")
DEFAULT_WINDOW_LEFT_FRAMES = 64
"""``w_left`` of a WSM window left unset when ``left_frames`` is unlimited: 64 frames, 1.28 s at 20 ms."""


def _check_dim(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"mixer_options.{name} must be a positive integer or None, got {value!r}")


@dataclass
class SummaryOptions:
    """``mixer_options`` of ``summary``.

    summary: ``"causal"`` (default, streamable): mean of ``s(x)`` over ``[t - left_frames, t]``, or over
        every frame so far when ``left_frames`` is None. ``"global"``: mean over the whole utterance's
        valid frames; offline only.
    local_dim, summary_dim: output widths of ``f`` and ``s``; None means ``d_model``.
    """

    summary: str = "causal"
    local_dim: int | None = None
    summary_dim: int | None = None

    def __post_init__(self) -> None:
        if self.summary not in SUMMARY_KINDS:
            raise ValueError(f"mixer_options.summary must be one of {SUMMARY_KINDS}, got {self.summary!r}")
        _check_dim("local_dim", self.local_dim)
        _check_dim("summary_dim", self.summary_dim)


@dataclass
class WSMOptions(SummaryOptions):
    """``mixer_options`` of ``wsm``: those of ``summary`` plus the local windows.

    windows: one or more ``(w_left, w_right)`` pairs in frames. ``w_left`` None means ``left_frames``
        (or :data:`DEFAULT_WINDOW_LEFT_FRAMES` when ``left_frames`` is unlimited); ``w_right`` None means
        the layer's ``right_frames``. A layer's look-ahead is its largest ``w_right``, and it adds up
        over layers. Default: one window ``(None, None)``, i.e. ``[t - L, t + R_layer]``.
    window_dim: output width of ``s_l``; None means ``d_model``.
    """

    windows: tuple[tuple[int | None, int | None], ...] = ((None, None),)
    window_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_dim("window_dim", self.window_dim)
        if isinstance(self.windows, (str, bytes)) or not hasattr(self.windows, "__len__") or not self.windows:
            raise ValueError(f"mixer_options.windows must be a non-empty list of (w_left, w_right) pairs, "
                             f"got {self.windows!r}")
        pairs = []
        for window in self.windows:
            if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
                raise ValueError(f"mixer_options.windows: each window must be a (w_left, w_right) pair, got {window!r}")
            for side, value in zip(("w_left", "w_right"), window):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                    raise ValueError(f"mixer_options.windows: {side} must be a non-negative integer or None, "
                                     f"got {value!r} in {window!r}")
            pairs.append((window[0], window[1]))
        self.windows = tuple(pairs)


def prefix_sums(values: Tensor) -> Tensor:
    """``(B, n, D)`` -> ``(B, n + 1, D)`` float64 ``p`` with ``p[:, k] = values[:, :k].sum(1)``."""
    return F.pad(values.to(torch.float64).cumsum(1), (0, 0, 1, 0))


def window_means(prefix: Tensor, prefix_start: int, first: int, n: int, w_left: int | None, w_right: int,
                 lengths: Tensor, dtype: torch.dtype) -> Tensor:
    """Means over ``[t - w_left, t + w_right]``, clipped to the valid frames, for ``t = first .. first+n-1``.

    Args:
        prefix: ``(B, K + 1, D)`` float64 prefix sums of values at absolute frames
            ``prefix_start .. prefix_start + K - 1`` (values at padded frames are 0): ``prefix[:, k+1] -
            prefix[:, k]`` is the value at frame ``prefix_start + k``. With ``w_left=None`` windows start at
            frame 0, so ``prefix[:, 0]`` must be the sum of all values before ``prefix_start``; with a finite
            ``w_left`` no window may start before ``prefix_start`` and any offset cancels.
        prefix_start: absolute frame of the first value.
        lengths: ``(B,)`` valid frames per stream; counts are taken over ``[0, lengths)``.
    Returns:
        ``(B, n, D)`` in ``dtype``. Outputs past a stream's length are finite but meaningless.
    """
    device = prefix.device
    t = torch.arange(first, first + n, device=device)
    available = prefix_start + prefix.shape[1] - 1
    hi = (t + w_right).clamp(max=available - 1)
    sums = prefix[:, hi + 1 - prefix_start]
    if w_left is None:
        lo = torch.zeros_like(t)
    else:
        lo = (t - w_left).clamp(min=0)
        sums = sums - prefix[:, lo - prefix_start]
    last_valid = torch.minimum((t + w_right).unsqueeze(0), lengths.to(device).unsqueeze(1) - 1)
    counts = (last_valid - lo + 1).clamp(min=1)
    return (sums / counts.unsqueeze(-1)).to(dtype)


def masked_prefix_sums(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 prefix sums ``(B, W + 1, D)`` of ``values`` ``(B, W, D)`` where ``valid`` ``(B, W)``, and of
    the valid count ``(B, W + 1, 1)``."""
    return prefix_sums(torch.where(valid.unsqueeze(-1), values, 0.0)), prefix_sums(valid.unsqueeze(-1))


def slot_means(prefix: Tensor, counts: Tensor, lo: int, hi: int, n: int, dtype: torch.dtype) -> Tensor:
    """Means over window slots ``[lo + o, hi + o]`` for ``o = 0 .. n - 1`` from :func:`masked_prefix_sums`."""
    sums = prefix[:, hi + 1:hi + 1 + n] - prefix[:, lo:lo + n]
    return (sums / (counts[:, hi + 1:hi + 1 + n] - counts[:, lo:lo + n]).clamp(min=1)).to(dtype)


@streaming_state
class SummaryState:
    """One SummaryMixing layer (``R`` its look-ahead, ``L`` ``left_frames``, ``w`` the widest ``w_left``):
    ``f`` ``(B, R, local_dim)`` of the frames waiting for look-ahead; ``s`` ``(B, L + R, summary_dim)`` of
    the latest frames (``(B, R, summary_dim)`` and the float64 sum ``s_before`` ``(B, summary_dim)`` of all
    earlier ones when ``L`` is None); ``l`` ``(B, w + R, window_dim)`` for the local windows (WSM)."""

    f: Tensor
    s: Tensor
    s_before: Tensor | None
    l: Tensor | None


def frame_mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU())


class SummaryMixer(LayerMixer):
    """One layer of SummaryMixing (``windows`` empty) or Windowed SummaryMixing.

    Args:
        name: the mixer family's name, for error messages.
        summary: ``"causal"`` or ``"global"``.
        left_frames: left extent of the causal summary (None: every frame so far).
        windows: resolved ``(w_left, w_right)`` pairs of the local windows, in frames.

    Streaming state: ``f(x)`` of the frames waiting for look-ahead; ``s(x)`` of the last ``left_frames``
    emitted frames and of the waiting ones (with an unlimited left context: of the waiting ones only,
    plus the float64 sum of all earlier ones); ``s_l(x)`` of the last ``max w_left`` emitted frames and
    of the waiting ones.
    """

    def __init__(self, name: str, d_model: int, summary: str, left_frames: int | None,
                 windows: list[tuple[int, int]], local_dim: int, summary_dim: int, window_dim: int):
        super().__init__()
        if summary not in SUMMARY_KINDS:
            raise ValueError(f"summary must be one of {SUMMARY_KINDS}, got {summary!r}")
        self.name = name
        self.summary = summary
        self.left_frames = left_frames
        self.windows = list(windows)
        self.f = frame_mlp(d_model, local_dim)
        self.s = frame_mlp(d_model, summary_dim)
        self.s_local = frame_mlp(d_model, window_dim) if self.windows else None
        combined = local_dim + summary_dim + len(self.windows) * window_dim
        self.combine = frame_mlp(combined, d_model)

    def forward(self, u: Tensor, lengths: Tensor) -> Tensor:
        """``u`` (B, T, D) LayerNorm-ed frames, ``lengths`` (B,) valid frames -> (B, T, D)."""
        batch, frames, _ = u.shape
        valid = (torch.arange(frames, device=u.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        parts = [self.f(u)]
        if self.s_local is not None:
            prefix = prefix_sums(torch.where(valid, self.s_local(u), 0.0))
            parts += [window_means(prefix, 0, 0, frames, w_left, w_right, lengths, u.dtype)
                      for w_left, w_right in self.windows]
        summary_values = torch.where(valid, self.s(u), 0.0)
        if self.summary == "global":
            total = summary_values.to(torch.float64).sum(1, keepdim=True)
            mean = (total / lengths.view(batch, 1, 1)).to(u.dtype)
            parts.append(mean.expand(batch, frames, mean.shape[2]))
        else:
            parts.append(window_means(prefix_sums(summary_values), 0, 0, frames, self.left_frames, 0,
                                      lengths, u.dtype))
        return self.combine(torch.cat(parts, dim=-1))

    def lookahead_frames(self) -> int | None:
        if self.summary == "global":
            return None
        return max((w_right for _, w_right in self.windows), default=0)

    def stream_error(self) -> str | None:
        if self.summary == "global":
            return (f"mixer {self.name!r} with mixer_options summary='global' averages over the whole "
                    "utterance and cannot stream; use summary='causal' to stream")
        return None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SummaryState:
        error = self.stream_error()
        if error is not None:
            raise ValueError(error)
        lag = self.lookahead_frames()

        def zeros(frames: int, width: int) -> Tensor:
            return torch.zeros(batch_size, frames, width, device=device, dtype=dtype)

        summary_dim = self.s[0].out_features
        left = 0 if self.left_frames is None else self.left_frames
        s_before = None
        if self.left_frames is None:
            s_before = torch.zeros(batch_size, summary_dim, device=device, dtype=torch.float64)
        local = None
        if self.s_local is not None:
            local = zeros(max(w for w, _ in self.windows) + lag, self.s_local[0].out_features)
        return SummaryState(zeros(lag, self.f[0].out_features), zeros(left + lag, summary_dim), s_before, local)

    def step(self, u: Tensor, chunk: Chunk, state: SummaryState) -> tuple[Tensor, SummaryState]:
        """``u`` ``(B, n, D)`` new frame slots -> ``(B, n, D)`` outputs ``R`` frames behind them.

        Output slot ``o`` is at position ``t = end - R - n + o``; in a window of width ``W + n`` pushed at
        the same ``end``, position ``t + d`` is slot ``W - R + o + d``.
        """
        n, lag = u.shape[1], self.lookahead_frames()
        local = push(state.f, self.f(u), chunk.count)
        parts = [local[:, :n]]
        new_local = None
        if self.s_local is not None:
            values = push(state.l, self.s_local(u), chunk.count)
            width = values.shape[1]
            prefix, counts = masked_prefix_sums(values, key_mask(chunk, ((width, 0),), n))
            centre = width - n - lag
            parts += [slot_means(prefix, counts, centre - w_left, centre + w_right, n, u.dtype)
                      for w_left, w_right in self.windows]
            new_local = keep_last(values, state.l.shape[1])

        values = push(state.s, self.s(u), chunk.count)
        width = values.shape[1]
        prefix, counts = masked_prefix_sums(values, key_mask(chunk, ((width, 0),), n))
        centre = width - n - lag
        s_before = None
        if self.left_frames is None:
            # Frames that leave the window are only needed through their running sum.
            t = chunk.end.view(-1, 1) - lag - n + torch.arange(n, device=u.device)
            seen = torch.minimum(t, chunk.valid_end.view(-1, 1) - 1) + 1
            sums = state.s_before.unsqueeze(1) + prefix[:, centre + 1:centre + 1 + n]
            parts.append((sums / seen.clamp(min=1).unsqueeze(-1)).to(u.dtype))
            s_before = state.s_before + prefix[:, n]
        else:
            parts.append(slot_means(prefix, counts, centre - self.left_frames, centre, n, u.dtype))
        new_state = SummaryState(keep_last(local, lag), keep_last(values, state.s.shape[1]), s_before, new_local)
        return self.combine(torch.cat(parts, dim=-1)), new_state


def _build(config: Any, name: str, windowed: bool) -> MixerStack:
    options = MIXERS[name].parse_options(config.mixer_options)
    d_model = config.d_model
    blocks = []
    for right_frames in config.right_frames_per_layer():
        windows: list[tuple[int, int]] = []
        if windowed:
            default_left = DEFAULT_WINDOW_LEFT_FRAMES if config.left_frames is None else config.left_frames
            windows = [(default_left if w_left is None else w_left, right_frames if w_right is None else w_right)
                       for w_left, w_right in options.windows]
        mixer = SummaryMixer(name, d_model, options.summary, config.left_frames, windows,
                             options.local_dim or d_model, options.summary_dim or d_model,
                             getattr(options, "window_dim", None) or d_model)
        blocks.append(Block(d_model, config.ffn_dim, config.dropout, mixer))
    return LayerStack(blocks)


@register_mixer("summary", options=SummaryOptions)
def build_summary(config: Any) -> MixerStack:
    """SummaryMixing: ``c([f(x_t); s_t])``. Causal by default; no look-ahead (``right_frames`` unused)."""
    return _build(config, "summary", windowed=False)


@register_mixer("wsm", options=WSMOptions)
def build_wsm(config: Any) -> MixerStack:
    """Windowed SummaryMixing: ``c([f(x_t); l_t; s_t])``; look-ahead = largest ``w_right``, summed over layers."""
    return _build(config, "wsm", windowed=True)
