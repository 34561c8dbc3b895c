"""Latency, declared and measured (docs/methods.md section 5).

*Declared* look-ahead comes from the formulas of each mixer family. *Measured* look-ahead comes from
:func:`measure_lookahead`, two ways:

* dependency: perturb the input from some point on and find the latest input an output depends on;
* emission: stream the input one frame at a time and record how many frames past its own each output
  had to wait before the streaming form emitted it.

Both must equal the declared value; the tests hold every mixer to that.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

# Latency is what the torch-free runtime reports from an export's metadata; only the probe needs torch.
if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Latency:
    """Declared algorithmic look-ahead of an encoder.

    ``frontend_lookahead_ms`` is how far past the end of its hop a frame reads (the ``conv`` frontend:
    25 ms window, 20 ms hop, so 5 ms; ``fbank``: 25 ms window, 10 ms hop, so 15 ms at either
    subsampling); ``encoder_lookahead_frames`` is the look-ahead of the transformer stack (``None``: the
    whole utterance). The paper's figures (1.92 s for 12-layer MAA with ``R = 8``) are the encoder part.
    """

    mixer: str
    n_layers: int
    frame_ms: float
    frontend_lookahead_ms: float
    frontend_receptive_field_ms: float
    encoder_lookahead_frames: int | None
    encoder_mean_lookahead_frames: float | None
    streamable: bool

    @property
    def encoder_lookahead_ms(self) -> float | None:
        if self.encoder_lookahead_frames is None:
            return None
        return self.encoder_lookahead_frames * self.frame_ms

    @property
    def encoder_mean_lookahead_ms(self) -> float | None:
        if self.encoder_mean_lookahead_frames is None:
            return None
        return self.encoder_mean_lookahead_frames * self.frame_ms

    @property
    def total_lookahead_ms(self) -> float | None:
        if self.encoder_lookahead_ms is None:
            return None
        return self.frontend_lookahead_ms + self.encoder_lookahead_ms

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(encoder_lookahead_ms=self.encoder_lookahead_ms,
                   encoder_mean_lookahead_ms=self.encoder_mean_lookahead_ms,
                   total_lookahead_ms=self.total_lookahead_ms)
        return out


@dataclass
class MeasuredLookahead:
    """What :func:`measure_lookahead` found. ``None`` means "depends on the whole input"/"cannot stream".

    ``frontend_lookahead_samples`` is in the frontend's input units: samples, or frames for ``none``.
    """

    dependency_frames: int | None
    dependency_mean_frames: float | None
    frontend_lookahead_samples: int
    emission_frames: int | None
    emission_mean_frames: float | None


def _dependency_ends(fn: Callable[[Tensor], Tensor], x: Tensor, probes: list[int],
                     own_end: Callable[[int], int], noise_seed: int) -> list[int | None]:
    """For each output frame in ``probes``, the last input index it depends on (``None``: the last one
    of ``x``, i.e. unbounded). Binary search on the start of a perturbation of the input's tail; all
    probes are searched at once, one batched forward per halving."""
    import torch

    n_units = x.shape[1]
    with torch.no_grad():
        reference = fn(x)[0]
        lo = [own_end(t) for t in probes]
        hi = [n_units] * len(probes)
        # Independent of x: noise proportional to x would be undone by the per-frame LayerNorms.
        generator = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(x.shape[1:], generator=generator, dtype=x.dtype)
        while any(h - low > 1 for low, h in zip(lo, hi)):
            mid = [(low + h) // 2 for low, h in zip(lo, hi)]
            batch = x.repeat(len(probes), *([1] * (x.dim() - 1)))
            for row, start in enumerate(mid):
                batch[row, start:] += noise[start:]
            out = fn(batch)
            for row, t in enumerate(probes):
                if hi[row] - lo[row] <= 1:
                    continue
                changed = (out[row, t] - reference[t]).abs().max() > 1e-9 * (1 + reference[t].abs().max())
                if changed:
                    lo[row] = mid[row]
                else:
                    hi[row] = mid[row]
    return [None if end == n_units - 1 else end for end in lo]


def measure_lookahead(encoder, probe_frames: int = 16, seed: int = 0) -> MeasuredLookahead:
    """Measure an encoder's look-ahead by perturbation and by streaming emission.

    Works on a float64 copy in eval mode, so dropout and rounding cannot hide or fake a dependency.
    Output frames ``4 .. 4 + probe_frames - 1`` are probed; use at least one segment's worth of frames
    for segment-based mixers, whose look-ahead varies with the position in the segment.
    """
    import torch

    model = copy.deepcopy(encoder).to(torch.float64).eval()
    geometry = model.frontend.geometry
    declared = model.stack.lookahead_frames()
    horizon = 32 if declared is None else declared
    first = 4
    probes = list(range(first, first + probe_frames))
    n_frames = first + probe_frames + horizon + 8
    generator = torch.Generator().manual_seed(seed)
    hop, first_end = geometry.hop, geometry.frame_end(0)
    input_dim = model.frontend.input_dim
    shape = (1, geometry.frame_end(n_frames - 1)) + (() if input_dim is None else (input_dim,))
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)

    def own_end(t: int) -> int:
        return t * hop + hop - 1

    ends = _dependency_ends(lambda batch: model(batch)[0], x, probes, own_end, seed + 1)
    # The frontend treats every frame alike (a convolution or a sliding window): a few probes suffice.
    frontend_probes = probes[::4]
    frontend_ends = _dependency_ends(lambda batch: model.frontend(batch)[0], x, frontend_probes, own_end, seed + 1)
    frontend_samples = max(end - own_end(t) for t, end in zip(frontend_probes, frontend_ends))
    if any(end is None for end in ends):
        dependency, dependency_mean = None, None
    else:
        frames = [(end - own_end(t) - frontend_samples) / hop for t, end in zip(probes, ends)]
        dependency = max(frames)
        dependency = int(dependency) if float(dependency).is_integer() else dependency
        dependency_mean = sum(frames) / len(frames)

    emission, emission_mean = None, None
    if model.stack.stream_error() is None:
        delays = []
        with torch.no_grad():
            state = model.init_state(1)
            for k in range(n_frames):
                chunk = x[:, :first_end] if k == 0 else x[:, first_end + (k - 1) * hop: first_end + k * hop]
                y, state = model.step(chunk, state)
                frames_out = int(state.frames_out[0])
                delays += [k - e for e in range(frames_out - y.shape[1], frames_out)]
        emission, emission_mean = max(delays), sum(delays) / len(delays)
    return MeasuredLookahead(dependency, dependency_mean, frontend_samples, emission, emission_mean)
