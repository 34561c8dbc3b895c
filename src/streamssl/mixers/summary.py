"""SummaryMixing ``summary`` and Windowed SummaryMixing ``wsm`` (METHODS.md section 4): linear-time mixers.

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

from streamssl.mixers.base import MIXERS, Block, LayerMixer, LayerStack, MixerStack, State, register_mixer

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
        prefix: ``(B, K + 1, D)`` float64; ``prefix[:, k]`` is the sum of the values at absolute frames
            ``< prefix_start + k`` (values before ``prefix_start`` included); values at padded frames are 0.
        prefix_start: absolute frame of ``prefix[:, 0]``. With a finite ``w_left`` no window may start
            before it; with ``w_left=None`` windows start at frame 0.
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
    emitted frames and of the waiting ones; ``s_l(x)`` of the last ``max w_left`` emitted frames and the
    waiting ones; and, per summary, the float64 sum of everything dropped (only an unlimited left
    context reads it).
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

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        error = self.stream_error()
        if error is not None:
            raise ValueError(error)

        def empty(width: int) -> Tensor:
            return torch.zeros(batch_size, 0, width, device=device, dtype=dtype)

        def dropped(width: int) -> Tensor:
            return torch.zeros(batch_size, width, device=device, dtype=torch.float64)

        summary_dim = self.s[0].out_features
        state: State = {"f": empty(self.f[0].out_features), "s": empty(summary_dim), "s_start": 0,
                        "s_dropped": dropped(summary_dim), "t_in": 0, "t_out": 0}
        if self.s_local is not None:
            window_dim = self.s_local[0].out_features
            state.update(l=empty(window_dim), l_start=0, l_dropped=dropped(window_dim))
        return state

    def step(self, u: Tensor, state: State, final: bool = False) -> tuple[Tensor, State]:
        """Feed ``u`` (B, n, D); return the outputs (B, m, D) of the oldest frames whose look-ahead is
        complete (all waiting frames when ``final``) and the new state."""
        batch = u.shape[0]
        t_in = state["t_in"] + u.shape[1]
        t_out = state["t_out"]
        ready = t_in - t_out if final else max(0, t_in - self.lookahead_frames() - t_out)
        lengths = torch.full((batch,), t_in, device=u.device)
        new: State = {"t_in": t_in, "t_out": t_out + ready}

        local = torch.cat([state["f"], self.f(u)], dim=1)
        parts = [local[:, :ready]]
        new["f"] = local[:, ready:]

        if self.s_local is not None:
            values = torch.cat([state["l"], self.s_local(u)], dim=1)
            prefix = state["l_dropped"].unsqueeze(1) + prefix_sums(values)
            parts += [window_means(prefix, state["l_start"], t_out, ready, w_left, w_right, lengths, u.dtype)
                      for w_left, w_right in self.windows]
            keep_from = t_out + ready - max(w_left for w_left, _ in self.windows)
            new["l"], new["l_start"], new["l_dropped"] = self._drop(values, state["l_start"], keep_from,
                                                                    state["l_dropped"])

        values = torch.cat([state["s"], self.s(u)], dim=1)
        prefix = state["s_dropped"].unsqueeze(1) + prefix_sums(values)
        parts.append(window_means(prefix, state["s_start"], t_out, ready, self.left_frames, 0, lengths, u.dtype))
        keep_from = t_out + ready - (0 if self.left_frames is None else self.left_frames)
        new["s"], new["s_start"], new["s_dropped"] = self._drop(values, state["s_start"], keep_from,
                                                                state["s_dropped"])
        return self.combine(torch.cat(parts, dim=-1)), new

    @staticmethod
    def _drop(values: Tensor, start: int, keep_from: int, dropped: Tensor) -> tuple[Tensor, int, Tensor]:
        """Forget the frames before ``keep_from``, folding them into the float64 running sum."""
        n_drop = min(max(0, keep_from - start), values.shape[1])
        dropped = dropped + values[:, :n_drop].to(torch.float64).sum(1)
        return values[:, n_drop:], start + n_drop, dropped


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
