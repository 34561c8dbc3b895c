"""BEST-RQ (Chiu et al., 2022): masked prediction of labels from a frozen random-projection quantiser.

Per batch (docs/methods.md section 4b)::

    x      = frontend input features (B, T_in, F)      # normalised log-mel, before any learned layer
    z      = stack s consecutive frames of x           # (B, T, s F): one vector per encoder frame
    label  = argmax_k <l2norm(z P_c), l2norm(E_c[k])>  # per codebook c: P_c (s F, dim) Xavier, E_c (entries, dim) N(0, 1)
    x'     = x with the input frames of masked encoder frames replaced by N(0, noise_std^2)
    logits = head(encoder(x'))                          # (B, T, codebooks, entries)
    loss   = mean over codebooks of cross-entropy(logits, label) at masked valid frames only

``P`` and ``E`` are buffers: saved in every checkpoint, never trained, drawn from a generator seeded by
``quantizer_seed`` (the same on every rank and in every run with that seed). Masks and noise come from
per-utterance seeds, so they do not depend on batch position or process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import EncoderConfig
from streamssl.encoder import Encoder
from streamssl.masking import span_mask
from streamssl.objectives.base import Objective, OneProcess, Reducer, code_perplexity


@dataclass
class BestRQOptions:
    """Options of the BEST-RQ objective (``PretrainConfig.objective_options`` when ``objective: bestrq``).

    codebook_entries, codebook_dim, codebooks: the frozen quantiser (paper: 8192 entries of 16 dims,
        one codebook; SpeechBrain's streaming recipe: 4096).
    mask_prob, mask_length: about ``mask_prob * T / mask_length`` spans of ``mask_length`` encoder
        frames are masked per utterance (spans may overlap; see :func:`streamssl.masking.span_mask`).
    noise_std: standard deviation of the normal noise that replaces masked input features (0.1).
    quantizer_seed: seeds the random projection and the codebook.
    """

    codebook_entries: int = 8192
    codebook_dim: int = 16
    codebooks: int = 1
    mask_prob: float = 0.45
    mask_length: int = 4
    noise_std: float = 0.1
    quantizer_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("codebook_entries", "codebook_dim", "codebooks", "mask_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"bestrq option {name} must be a positive integer, got {value!r}")
        if self.codebook_entries < 2:
            raise ValueError(f"bestrq option codebook_entries must be at least 2, got {self.codebook_entries}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"bestrq option mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.noise_std < 0:
            raise ValueError(f"bestrq option noise_std must be non-negative, got {self.noise_std}")
        if not isinstance(self.quantizer_seed, int):
            raise ValueError(f"bestrq option quantizer_seed must be an integer, got {self.quantizer_seed!r}")


class RandomProjectionQuantizer(nn.Module):
    """Frozen labels: ``(N, in_dim)`` vectors -> ``(N, codebooks)`` nearest-codeword indices.

    Both the projected vector and the codewords are l2-normalised, so "nearest" is the largest cosine.
    """

    def __init__(self, in_dim: int, codebooks: int, entries: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        bound = (6.0 / (in_dim + dim)) ** 0.5  # Xavier (Glorot) uniform
        self.register_buffer("projection", (torch.rand(codebooks, in_dim, dim, generator=g) * 2 - 1) * bound)
        self.register_buffer("codebook", F.normalize(torch.randn(codebooks, entries, dim, generator=g), dim=-1))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(torch.einsum("ni,cid->ncd", x.float(), self.projection), dim=-1)
        return torch.einsum("ncd,ced->nce", z, self.codebook).argmax(-1)


class BestRQPretrainer(Objective):
    """An encoder, the frozen quantiser and a softmax head. After pretraining only ``self.encoder`` is kept.

    The encoder's frontend must expose input features before its learned layers
    (:meth:`streamssl.frontends.Frontend.input_feature_layout` is not ``None``): a waveform frontend has none.
    """

    name = "bestrq"
    Options = BestRQOptions

    def __init__(self, encoder_config: EncoderConfig, options: BestRQOptions):
        super().__init__()
        self.options = options
        self.codebook_entries = options.codebook_entries
        self.encoder = Encoder(encoder_config)
        layout = self.encoder.frontend.input_feature_layout()
        if layout is None:
            raise ValueError(f"the bestrq objective needs a frontend with input features to mask and quantise; "
                             f"frontend {encoder_config.frontend!r} has none (use fbank or none)")
        self.stack, input_dim = layout
        self.quantizer = RandomProjectionQuantizer(self.stack * input_dim, options.codebooks,
                                                   options.codebook_entries, options.codebook_dim,
                                                   options.quantizer_seed)
        self.head = nn.Linear(encoder_config.d_model, options.codebooks * options.codebook_entries)

    def chance_accuracy(self, code_counts: Tensor) -> float:
        """Accuracy of the best constant guess: the share of the most frequent label among masked
        frames, averaged over codebooks. ``code_counts``: ``(codebooks, entries)`` label counts."""
        counts = code_counts.double()
        return float((counts.max(-1).values / counts.sum(-1).clamp(min=1)).mean())

    def labels(self, inputs: Tensor) -> Tensor:
        """Input features ``(B, T_in, F)`` -> labels ``(B, ceil(T_in / s), codebooks)``.

        Encoder frame ``t`` is labelled from input frames ``[s t, s t + s)`` (zero-padded past the end).
        """
        batch, frames_in, dim = inputs.shape
        frames = -(-frames_in // self.stack)
        padded = F.pad(inputs, (0, 0, 0, frames * self.stack - frames_in))
        stacked = padded.reshape(batch * frames, self.stack * dim)
        return self.quantizer(stacked).view(batch, frames, -1)

    def forward(self, inputs: Tensor, lengths: Tensor, seeds: list[int], step: int,
                world: Reducer | None = None) -> dict[str, Tensor]:
        """The loss of one batch.

        Args:
            inputs: what the encoder takes: ``(B, S)`` waveform (fbank frontend) or ``(B, T, input_dim)``
                frames (``frontend="none"``); ``lengths``: ``(B,)`` valid samples or frames.
            seeds: one seed per utterance (masks and noise).
            step: the optimiser step (unused: the targets never change).
            world: sums counts over processes (DDP); ``None``: a single process.
        Returns:
            ``loss`` (this rank's share: DDP's average over ranks gives the global loss) and detached,
            globally reduced metrics: ``cross_entropy`` (= ``objective``), ``accuracy`` (how often the
            arg-max of the head is the label, at masked frames), ``chance`` (the best constant guess on
            this batch), ``masked`` (masked frames), ``masked_fraction`` (of valid frames) and
            ``code_counts`` ``(codebooks, entries)``: how often each label occurs at masked frames.
        """
        world = world or OneProcess()
        opts = self.options
        captured: dict[str, Tensor] = {}

        def mask_inputs(x: Tensor, input_lengths: Tensor) -> Tensor:
            labels = self.labels(x)
            full_frames = torch.div(input_lengths, self.stack, rounding_mode="floor").clamp(min=1)
            mask = span_mask(full_frames, seeds, opts.mask_prob, opts.mask_length, labels.shape[1])
            input_mask = mask.repeat_interleave(self.stack, dim=1)[:, :x.shape[1]]
            input_mask &= torch.arange(x.shape[1], device=x.device)[None, :] < input_lengths[:, None]
            noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s ^ 0x4E015E))
                                 for s in seeds]).to(device=x.device, dtype=x.dtype)
            captured.update(labels=labels, mask=mask)
            return torch.where(input_mask[..., None], opts.noise_std * noise, x)

        feats, frame_lengths = self.encoder.features(inputs, lengths, augment=mask_inputs)
        out = self.encoder.encode_frames(self.encoder.project(feats), frame_lengths)
        frames = min(out.shape[1], captured["labels"].shape[1])
        valid = torch.arange(frames, device=out.device)[None, :] < frame_lengths[:, None]
        mask = captured["mask"][:, :frames].to(out.device) & valid
        labels = captured["labels"][:, :frames][mask]                           # (M, codebooks)
        logits = self.head(out[:, :frames][mask]).float().view(-1, opts.codebooks, opts.codebook_entries)

        n_masked = world.sum(mask.sum().float()).clamp(min=1)
        n_valid = world.sum(valid.sum().float()).clamp(min=1)
        total = F.cross_entropy(logits.reshape(-1, opts.codebook_entries), labels.reshape(-1), reduction="sum")
        cross_entropy = total / (n_masked * opts.codebooks)
        with torch.no_grad():
            correct = world.sum((logits.argmax(-1) == labels).sum().float())
            counts = torch.zeros(opts.codebooks, opts.codebook_entries, device=out.device)
            counts.scatter_add_(1, labels.T, torch.ones_like(labels.T, dtype=counts.dtype))
            counts = world.sum(counts)
            metrics = {
                "cross_entropy": world.sum(cross_entropy), "accuracy": correct / (n_masked * opts.codebooks),
                "chance": torch.tensor(self.chance_accuracy(counts)), "masked": n_masked,
                "masked_fraction": n_masked / n_valid, "code_perplexity": code_perplexity(counts),
                "code_counts": counts,
            }
            metrics["objective"] = metrics["cross_entropy"]
        return {"loss": world.size * cross_entropy, **metrics}
