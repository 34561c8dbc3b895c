"""The wav2vec 2.0 objective (Baevski et al., 2020) around any :class:`~streamssl.Encoder`.

Per utterance::

    feats  = encoder.features(wave)                 # (T, C) frontend features: the targets' source
    q      = quantiser(LayerNorm(feats))            # (T, final_dim) Gumbel-softmax product quantiser
    h      = encoder.project(feats); h[masked] = e  # spans of frames replaced by a learned embedding e
    c      = final_proj(encoder.encode_frames(h))   # (T, final_dim) context vectors
    loss   = contrastive(c[masked], q[masked], K distractors from the utterance's other masked frames)
           + diversity_weight * (1 - perplexity / (G V)) + feature_penalty_weight * mean(feats^2)

Every random choice (mask spans, distractors, Gumbel noise) is drawn from a generator seeded by
:func:`utterance_seed` (run seed, step, utterance id), so it does not depend on which process or
batch position an utterance lands in: a DDP run and a single-process run see the same masks.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import EncoderConfig
from streamssl.encoder import Encoder
from streamssl.train.config import PretrainConfig
from streamssl.train.dist import World


def utterance_seed(seed: int, step: int, utterance_id: str) -> int:
    """A 63-bit seed for one utterance at one step, stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}/{step}/{utterance_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def span_mask(frame_lengths: Tensor, seeds: list[int], prob: float, span: int, total: int) -> Tensor:
    """Boolean ``(B, total)`` mask: about ``prob * T / span`` spans of ``span`` frames start at random
    valid frames of each utterance (spans may overlap; at least one span). Padding is never masked.

    Args:
        frame_lengths: ``(B,)`` valid frames per utterance.
        seeds: one generator seed per utterance.
    """
    mask = torch.zeros(len(seeds), total, dtype=torch.bool)
    for b, (length, seed) in enumerate(zip(frame_lengths.tolist(), seeds)):
        g = torch.Generator().manual_seed(seed)
        width = min(span, length)
        n_spans = int(prob * length / width + torch.rand((), generator=g))  # random rounding
        n_spans = min(max(n_spans, 1), length - width + 1)
        for start in torch.randperm(length - width + 1, generator=g)[:n_spans].tolist():
            mask[b, start:start + width] = True
    return mask.to(frame_lengths.device)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class GumbelQuantizer(nn.Module):
    """Product quantiser: ``groups`` codebooks of ``entries`` vectors of ``dim // groups`` each.

    Training picks one entry per group with a straight-through Gumbel softmax (hard one-hot forward,
    soft gradient); evaluation takes the arg-max. The concatenated entries are projected to ``dim``.
    """

    def __init__(self, in_dim: int, groups: int, entries: int, dim: int):
        super().__init__()
        self.groups, self.entries = groups, entries
        self.logits = nn.Linear(in_dim, groups * entries)
        self.codebook = nn.Parameter(torch.rand(groups, entries, dim // groups))
        self.out = nn.Linear(dim, dim)
        nn.init.normal_(self.logits.weight, std=1.0)
        nn.init.zeros_(self.logits.bias)

    def forward(self, x: Tensor, temperature: float, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x`` ``(N, in_dim)`` -> codevectors ``(N, dim)`` and soft probabilities ``(N, groups, entries)``.

        ``noise``: uniform ``(0, 1)`` samples ``(N, groups * entries)`` for the Gumbel trick, or ``None``
        for the deterministic arg-max.
        """
        n = x.shape[0]
        logits = self.logits(x).float().view(n, self.groups, self.entries)
        probs = logits.softmax(dim=-1)
        if noise is not None:
            gumbel = -torch.log(-torch.log(noise.view(n, self.groups, self.entries).clamp(1e-10, 1 - 1e-7)))
            soft = ((logits + gumbel) / temperature).softmax(dim=-1)
        else:
            soft = probs
        hard = F.one_hot(soft.argmax(dim=-1), self.entries).to(soft.dtype)
        choice = hard - soft.detach() + soft if noise is not None else hard
        codes = torch.einsum("ngv,gvd->ngd", choice, self.codebook.float()).reshape(n, -1)
        return self.out(codes.to(x.dtype)), probs


class Wav2Vec2Pretrainer(nn.Module):
    """An encoder plus everything the wav2vec 2.0 objective adds (mask embedding, quantiser, projections).

    After pretraining only ``self.encoder`` is kept for fine-tuning.
    """

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder)
        enc: EncoderConfig = config.encoder
        self.mask_embedding = nn.Parameter(torch.empty(enc.d_model).uniform_())
        self.target_norm = nn.LayerNorm(self.encoder.feature_dim)
        self.quantizer = GumbelQuantizer(self.encoder.feature_dim, config.codebook_groups,
                                         config.codebook_entries, config.final_dim)
        self.final_proj = nn.Linear(enc.d_model, config.final_dim)

    def temperature(self, step: int) -> float:
        cfg = self.config
        return max(cfg.gumbel_start * cfg.gumbel_decay ** step, cfg.gumbel_end)

    def forward(self, wave: Tensor, lengths: Tensor, seeds: list[int], step: int,
                world: World | None = None) -> dict[str, Tensor]:
        """The loss of one batch.

        Args:
            wave: ``(B, S)`` 16 kHz waveform; ``lengths``: ``(B,)`` valid samples.
            seeds: one :func:`utterance_seed` per utterance (masks, distractors, Gumbel noise).
            step: the optimiser step (sets the Gumbel temperature).
            world: the process group; losses are normalised by counts summed over all ranks.
        Returns:
            ``loss`` (this rank's share: DDP's average over ranks is the global loss) and detached,
            globally reduced metrics: ``contrastive``, ``diversity``, ``feature_penalty``, ``accuracy``
            (how often the true target scores highest), ``perplexity``, ``temperature``, ``masked`` and ``objective`` (the total loss).
        """
        world = world or World()
        cfg = self.config
        feats, frame_lengths = self.encoder.features(wave, lengths)
        batch, frames, channels = feats.shape
        if cfg.feature_grad_scale != 1.0:
            feats = _ScaleGrad.apply(feats, cfg.feature_grad_scale) if cfg.feature_grad_scale > 0 else feats.detach()
        valid = torch.arange(frames, device=feats.device)[None, :] < frame_lengths[:, None]
        generators = [torch.Generator().manual_seed(s) for s in seeds]

        # Feature penalty: mean square of valid frontend features.
        n_valid = world.sum(valid.sum().float())
        penalty = (feats.float().pow(2).sum(-1) * valid).sum() / (n_valid * channels)

        # Quantised targets of the unmasked features.
        noise = None
        if self.training:
            noise = torch.zeros(batch, frames, cfg.codebook_groups * cfg.codebook_entries)
            for b, g in enumerate(generators):
                noise[b, :int(frame_lengths[b])] = torch.rand(int(frame_lengths[b]), noise.shape[2], generator=g)
            noise = noise.to(feats.device)[valid]
        targets, probs = self.quantizer(self.target_norm(feats[valid]), self.temperature(step), noise)

        # Diversity: perplexity of the batch-average code distribution, over every rank's frames.
        mean_probs = world.differentiable_sum(probs.sum(0)) / n_valid
        perplexity = torch.exp(-(mean_probs * torch.log(mean_probs + 1e-7)).sum(-1)).sum()
        n_codes = cfg.codebook_groups * cfg.codebook_entries
        diversity = (n_codes - perplexity) / n_codes

        # Masked context vectors.
        mask = span_mask(frame_lengths, [int(torch.randint(2**62, (), generator=g)) for g in generators],
                         cfg.mask_prob, cfg.mask_length, frames)
        h = self.encoder.project(feats)
        h = torch.where(mask[..., None], self.mask_embedding.to(h.dtype), h)
        context = self.final_proj(self.encoder.encode_frames(h, frame_lengths))

        # Contrastive loss per utterance against distractors from its own masked frames.
        target_of = torch.full((batch, frames), -1, dtype=torch.long, device=feats.device)
        target_of[valid] = torch.arange(int(valid.sum()), device=feats.device)
        losses, correct, n_masked_local = [], [], 0
        for b, g in enumerate(generators):
            where = mask[b].nonzero().squeeze(1)
            m = where.numel()
            if m < 2:
                continue
            pick = torch.randint(m - 1, (m, cfg.num_negatives), generator=g).to(feats.device)
            pick = pick + (pick >= torch.arange(m, device=feats.device)[:, None]).long()  # skip the target
            positive = targets[target_of[b, where]]                      # (m, F)
            candidates = torch.cat([positive[:, None], positive[pick]], dim=1)  # (m, 1 + K, F)
            logits = F.cosine_similarity(context[b, where][:, None].float(), candidates.float(), dim=-1)
            logits = logits / cfg.logit_temperature
            # A distractor that quantised to the target's own code is no distractor.
            same = (positive[pick] == positive[:, None]).all(-1)
            logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
            losses.append(F.cross_entropy(logits, torch.zeros(m, dtype=torch.long, device=logits.device),
                                          reduction="sum"))
            correct.append((logits.argmax(-1) == 0).sum())
            n_masked_local += m
        n_masked = world.sum(torch.tensor(float(n_masked_local), device=feats.device)).clamp(min=1)
        contrastive = torch.stack(losses).sum() / n_masked if losses else context.sum() * 0.0

        local = contrastive + cfg.feature_penalty_weight * penalty
        # DDP averages gradients over ranks; the diversity term is already global on every rank.
        loss = world.size * local + cfg.diversity_weight * diversity
        with torch.no_grad():
            accuracy = (torch.stack(correct).sum().float() if correct else n_masked * 0) / n_masked
            metrics = {
                "contrastive": world.sum(contrastive), "diversity": diversity.detach(),
                "feature_penalty": world.sum(penalty), "accuracy": world.sum(accuracy),
                "perplexity": perplexity.detach(), "masked": n_masked,
                "temperature": torch.tensor(self.temperature(step)),
            }
            metrics["objective"] = (metrics["contrastive"] + cfg.diversity_weight * metrics["diversity"]
                                    + cfg.feature_penalty_weight * metrics["feature_penalty"])
        return {"loss": loss, **metrics}
