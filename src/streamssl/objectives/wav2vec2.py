"""The wav2vec 2.0 objective (Baevski et al., 2020) around any :class:`~streamssl.Encoder`.

Per utterance::

    feats  = encoder.features(wave)                 # (T, C) frontend features: the targets' source
    q      = quantiser(LayerNorm(feats))            # (T, final_dim) Gumbel-softmax product quantiser
    h      = encoder.project(feats); h[masked] = e  # spans of frames replaced by a learned embedding e
    c      = final_proj(encoder.encode_frames(h))   # (T, final_dim) context vectors
    loss   = contrastive(c[masked], q[masked], K distractors from the utterance's other masked frames)
           + diversity_weight * (1 - perplexity / (G V)) + feature_penalty_weight * mean(feats^2)

Every random choice (mask spans, distractors, Gumbel noise) is drawn from a generator seeded by
:func:`~streamssl.masking.utterance_seed` (run seed, step, utterance id), so it does not depend on which
process or batch position an utterance lands in: a DDP run and a single-process run see the same masks.
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


@dataclass(frozen=True)
class Wav2Vec2Options:
    """Options of the wav2vec 2.0 objective (``PretrainConfig.objective_options`` when ``objective: wav2vec2``);
    the defaults are the BASE values.

    Masking: spans of ``mask_length`` projected frames start at a fraction ``mask_prob`` of the frames
    (spans may overlap), replaced by a learned embedding. Quantiser: ``codebook_groups`` groups of
    ``codebook_entries`` entries, projected to ``final_dim``, picked with a straight-through Gumbel softmax
    whose temperature decays from ``gumbel_start`` by ``gumbel_decay`` per step down to ``gumbel_end``.
    Contrastive loss: cosine similarity / ``logit_temperature`` of the context vector with its quantised
    target and with ``num_negatives`` distractors drawn from other masked frames of the same utterance.
    ``diversity_weight`` and ``feature_penalty_weight`` weigh the two extra losses;
    ``feature_grad_scale`` scales the gradient reaching the frontend.
    """

    mask_prob: float = 0.65
    mask_length: int = 10
    num_negatives: int = 100
    logit_temperature: float = 0.1
    codebook_groups: int = 2
    codebook_entries: int = 320
    final_dim: int = 256
    gumbel_start: float = 2.0
    gumbel_end: float = 0.5
    gumbel_decay: float = 0.999995
    diversity_weight: float = 0.1
    feature_penalty_weight: float = 10.0
    feature_grad_scale: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"wav2vec2 option mask_prob must be in (0, 1), got {self.mask_prob}")
        for name in ("mask_length", "num_negatives", "codebook_groups", "codebook_entries", "final_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"wav2vec2 option {name} must be a positive integer, got {value!r}")
        if self.final_dim % self.codebook_groups:
            raise ValueError(f"wav2vec2 option final_dim ({self.final_dim}) must be divisible by "
                             f"codebook_groups ({self.codebook_groups})")
        if self.logit_temperature <= 0:
            raise ValueError(f"wav2vec2 option logit_temperature must be positive, got {self.logit_temperature}")
        if not 0 < self.gumbel_end <= self.gumbel_start:
            raise ValueError(f"wav2vec2 options need 0 < gumbel_end <= gumbel_start, got "
                             f"{self.gumbel_end}, {self.gumbel_start}")
        if not 0 < self.gumbel_decay <= 1:
            raise ValueError(f"wav2vec2 option gumbel_decay must be in (0, 1], got {self.gumbel_decay}")
        for name in ("diversity_weight", "feature_penalty_weight", "feature_grad_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"wav2vec2 option {name} must be non-negative, got {getattr(self, name)}")


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


class Wav2Vec2Pretrainer(Objective):
    """An encoder plus everything the wav2vec 2.0 objective adds (mask embedding, quantiser, projections).

    After pretraining only ``self.encoder`` is kept for fine-tuning.
    """

    name = "wav2vec2"
    Options = Wav2Vec2Options

    def __init__(self, encoder_config: EncoderConfig, options: Wav2Vec2Options):
        super().__init__()
        self.options = options
        self.codebook_entries = options.codebook_entries
        self.encoder = Encoder(encoder_config)
        self.mask_embedding = nn.Parameter(torch.empty(encoder_config.d_model).uniform_())
        self.target_norm = nn.LayerNorm(self.encoder.feature_dim)
        self.quantizer = GumbelQuantizer(self.encoder.feature_dim, options.codebook_groups,
                                         options.codebook_entries, options.final_dim)
        self.final_proj = nn.Linear(encoder_config.d_model, options.final_dim)

    def temperature(self, step: int) -> float:
        cfg = self.options
        return max(cfg.gumbel_start * cfg.gumbel_decay ** step, cfg.gumbel_end)

    def forward(self, wave: Tensor, lengths: Tensor, seeds: list[int], step: int,
                world: Reducer | None = None) -> dict[str, Tensor]:
        """The loss of one batch.

        Args:
            wave: ``(B, S)`` 16 kHz waveform; ``lengths``: ``(B,)`` valid samples.
            seeds: one :func:`~streamssl.masking.utterance_seed` per utterance (masks, distractors, Gumbel noise).
            step: the optimiser step (sets the Gumbel temperature).
            world: the process group; losses are normalised by counts summed over all ranks.
        Returns:
            ``loss`` (this rank's share: DDP's average over ranks is the global loss) and detached,
            globally reduced metrics: ``contrastive``, ``diversity``, ``feature_penalty``, ``accuracy``
            (how often the true target scores highest), ``chance`` (the mean over masked frames of
            ``1 / (1 + distractors)``, counting only distractors whose code differs from the target's: the
            accuracy of context vectors that carry nothing), ``perplexity`` (soft, of the batch-average code
            distribution, summed over groups), ``code_perplexity`` (hard, per group, see
            :func:`~streamssl.objectives.base.code_perplexity`), ``temperature``, ``masked``,
            ``masked_fraction`` (of valid frames), ``code_counts`` ``(groups, entries)`` (arg-max codes of
            the valid frames) and ``objective`` (the total loss).
        """
        world = world or OneProcess()
        cfg = self.options
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
        losses, correct, chance_hits, n_masked_local = [], [], [], 0
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
            chance_hits.append((1.0 / (1.0 + (~same).sum(-1).float())).sum())
            n_masked_local += m
        n_masked = world.sum(torch.tensor(float(n_masked_local), device=feats.device)).clamp(min=1)
        contrastive = torch.stack(losses).sum() / n_masked if losses else context.sum() * 0.0

        local = contrastive + cfg.feature_penalty_weight * penalty
        # DDP averages gradients over ranks; the diversity term is already global on every rank.
        loss = world.size * local + cfg.diversity_weight * diversity
        with torch.no_grad():
            accuracy = (torch.stack(correct).sum().float() if correct else n_masked * 0) / n_masked
            chance = world.sum(torch.stack(chance_hits).sum() if chance_hits else n_masked * 0) / n_masked
            codes = probs.argmax(-1)                                              # (N, groups)
            counts = torch.zeros(cfg.codebook_groups, cfg.codebook_entries, device=feats.device)
            counts.scatter_add_(1, codes.T, torch.ones_like(codes.T, dtype=counts.dtype))
            counts = world.sum(counts)
            metrics = {
                "contrastive": world.sum(contrastive), "diversity": diversity.detach(),
                "feature_penalty": world.sum(penalty), "accuracy": world.sum(accuracy),
                "chance": chance, "perplexity": perplexity.detach(), "code_perplexity": code_perplexity(counts),
                "code_counts": counts, "masked": n_masked, "masked_fraction": n_masked / n_valid.clamp(min=1),
                "temperature": torch.tensor(self.temperature(step)),
            }
            metrics["objective"] = (metrics["contrastive"] + cfg.diversity_weight * metrics["diversity"]
                                    + cfg.feature_penalty_weight * metrics["feature_penalty"])
        return {"loss": loss, **metrics}
