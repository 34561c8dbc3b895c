"""The two training tasks as the :class:`~streamssl.train.trainer.Trainer` drives them: what a batch's
loss is, what to evaluate on dev data, and what goes into a checkpoint besides the weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathlib import Path

from streamssl.asr.ctc import CharVocab, CTCModel
from streamssl.asr.vocab import SentencePieceVocab, train_sentencepiece
from streamssl.asr.evaluate import evaluate_model
from streamssl.config import EncoderConfig
from streamssl.encoder import Encoder
from streamssl.masking import utterance_seed
from streamssl.objectives import code_perplexity
from streamssl.train.checkpoint import build_model, mixer_label, payload_vocab, read_payload
from streamssl.train.augment import SpecAugment
from streamssl.train.config import FinetuneConfig, PretrainConfig, RunConfig
from streamssl.train.data import CutSplit, crop_batch, cut_texts
from streamssl.train.sources import resolve_init
from streamssl.train.dist import World

# Utterances per batch when estimating a frontend's global statistics.
STATISTICS_BATCH = 16


def fit_frontend_statistics(encoder: nn.Module, utterances: list, config: RunConfig, sample_rate: int,
                            log=print) -> None:
    """Estimate the global feature statistics of ``encoder``'s frontend (the ``fbank`` mean and variance)
    from ``config.normalizer_utterances`` training utterances, drawn by ``config.seed``, unaugmented.

    A frontend whose statistics are already set (e.g. loaded with a pretrained encoder) keeps them; a
    frontend without statistics, or an encoder that is not a streamssl :class:`Encoder`, is left alone.
    """
    if not isinstance(encoder, Encoder) or not encoder.frontend.needs_statistics():
        return
    from streamssl.data import AudioDataset, collate

    pick = np.random.default_rng(config.seed).permutation(len(utterances))[: config.normalizer_utterances]
    dataset = AudioDataset([utterances[i] for i in sorted(pick.tolist())], sample_rate=sample_rate)

    def batches():
        for start in range(0, len(dataset), STATISTICS_BATCH):
            batch = collate([dataset[i] for i in range(start, min(start + STATISTICS_BATCH, len(dataset)))])
            yield batch["audio"], batch["lengths"]

    frames = encoder.frontend.fit_normalizer(batches())
    log(f"frontend statistics: {frames} frames of {len(dataset)} training utterances")


def finetune_vocab(config: FinetuneConfig, train: "list | CutSplit", run_dir: str | Path,
                   log=print) -> CharVocab | SentencePieceVocab:
    """The CTC vocabulary of a fine-tuning run (``config.vocab``): characters; or a sentencepiece model
    trained on the transcripts of ``train`` (a fresh run), or the one in ``run_dir``'s checkpoint (a
    resumed run, which must go on with the pieces it started with)."""
    options = config.vocab_options()
    if options.kind == "characters":
        return CharVocab()
    checkpoint = Path(run_dir) / "checkpoint.pt"
    if checkpoint.exists():
        saved = payload_vocab(read_payload(checkpoint))
        if isinstance(saved, SentencePieceVocab):
            return saved
    texts = cut_texts(train) if isinstance(train, CutSplit) else [u.text for u in train]
    vocab = SentencePieceVocab(model_proto=train_sentencepiece(texts, options.size, options.model_type))
    log(f"sentencepiece vocabulary: {options.model_type}, {len(vocab) - 1} pieces, from {len(texts)} "
        "training transcripts")
    return vocab


class PretrainTask:
    """Self-supervised pretraining of ``config.encoder`` with ``config.objective``."""

    kind = "pretrain"
    find_unused_parameters = False

    def __init__(self, config: PretrainConfig):
        self.config = config
        self.encoder_config: EncoderConfig = config.encoder
        self.mixer_label = mixer_label(config, config.encoder)
        self.vocab: CharVocab | None = None
        self.model: nn.Module = build_model("pretrain", config, config.encoder)
        self.codebook_entries: int = self.model.codebook_entries
        self.sample_rate = config.encoder.sample_rate

    def prepare(self, utterances: list, log=print) -> None:
        """Before the first step of a fresh run: the frontend's global statistics from training data."""
        fit_frontend_statistics(self.model.encoder, utterances, self.config, self.sample_rate, log)

    def seeds(self, ids: list[str], step: int) -> list[int]:
        return [utterance_seed(self.config.seed, step, i) for i in ids]

    def loss(self, module: nn.Module, batch: dict, step: int, world: World) -> dict:
        seeds = self.seeds(batch["ids"], step)
        audio, lengths = batch["audio"], batch["lengths"]
        if self.config.crop_seconds:
            crop = int(self.config.crop_seconds * self.encoder_config.sample_rate)
            audio, lengths = crop_batch(audio, lengths, crop, [s ^ 0x5EED for s in seeds])
        out = module(audio.to(world.device), lengths.to(world.device), seeds, step, world)
        # Both objectives divide their main term by the masked frames of every rank.
        out["loss_count"] = out["masked"]
        return out

    @torch.no_grad()
    def evaluate(self, utterances: list, world: World) -> dict[str, float]:
        """Dev objective, accuracy, chance, code perplexity and masked fraction over all of ``utterances``,
        with fixed masks (step 0 seeds) and arg-max codes. Accuracy and chance are means over masked
        frames; code perplexity is that of the code histogram of the whole dev set."""
        from streamssl.data import AudioDataset, collate

        self.model.eval()
        dataset = AudioDataset(utterances, sample_rate=self.sample_rate)
        objective = masked = correct = chance = valid = 0.0
        counts = None
        for start in range(0, len(dataset), 8):
            batch = collate([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            out = self.loss(self.model, batch, 0, World(device=world.device))
            n = float(out["masked"])
            objective += float(out["objective"]) * n
            correct += float(out["accuracy"]) * n
            chance += float(out["chance"]) * n
            masked += n
            valid += n / max(float(out["masked_fraction"]), 1e-12)
            counts = out["code_counts"].cpu() if counts is None else counts + out["code_counts"].cpu()
        self.model.train()
        chance_of = getattr(self.model, "chance_accuracy", None)
        return {"dev_objective": objective / masked, "dev_accuracy": correct / masked,
                "dev_chance": chance_of(counts) if chance_of is not None else chance / masked,
                "dev_code_perplexity": float(code_perplexity(counts)), "dev_masked_fraction": masked / valid}

    def before_step(self, step: int) -> bool:
        return True


class FinetuneTask:
    """CTC fine-tuning from ``config.init`` (or from scratch with ``config.encoder``) over ``vocab``
    (:func:`finetune_vocab`; default characters)."""

    kind = "finetune"

    def __init__(self, config: FinetuneConfig, log=print, vocab: CharVocab | SentencePieceVocab | None = None):
        self.config = config
        self.vocab = vocab if vocab is not None else CharVocab()
        init = resolve_init(config.init) if config.init is not None else None
        self.encoder_config = init.encoder_config if init is not None else config.encoder
        self.mixer_label = mixer_label(config, self.encoder_config)
        self.model: CTCModel = build_model("finetune", config, self.encoder_config, self.vocab)
        if init is not None:
            init.load_into(self.model)
            log(f"encoder initialised from {config.init}"
                f"{' (with its mask embedding)' if init.mask_embedding is not None else ''}")
        from streamssl.selective.finetune import apply_train_mode

        apply_train_mode(self.model, config.train_mode, config.replace_layers, config.replace_mixer,
                         config.replace_options)
        # The encoder gets no gradient during the frozen warm-up, so DDP must expect unused parameters.
        self.find_unused_parameters = config.freeze_encoder_steps > 0
        self.sample_rate = int(self.model.sample_rate)
        options = config.augment_options()
        self.spec_augment = SpecAugment(options) if options.spec_augment else None
        if self.spec_augment is not None and not isinstance(self.model, CTCModel):
            raise ValueError("FinetuneConfig.augment: SpecAugment needs a streamssl encoder; "
                             f"{config.init} is not one")

    def prepare(self, utterances: list, log=print) -> None:
        """Before the first step of a fresh run: the frontend's global statistics from training data,
        unless the encoder came with them (``init``)."""
        fit_frontend_statistics(self.model.encoder, utterances, self.config, self.sample_rate, log)

    def encoder_trains(self, step: int) -> bool:
        return step >= self.config.freeze_encoder_steps

    def loss(self, module: nn.Module, batch: dict, step: int, world: World) -> dict:
        seeds = [utterance_seed(self.config.seed, step, i) for i in batch["ids"]]
        targets = [torch.tensor(self.vocab.encode(t), dtype=torch.long) for t in batch["texts"]]
        target_lengths = torch.tensor([len(t) for t in targets])
        extra = {}
        if self.spec_augment is not None:
            extra["augment"] = self.spec_augment.for_batch([s ^ 0x5BEC for s in seeds])
        log_probs, frame_lengths = module(batch["audio"].to(world.device), batch["lengths"].to(world.device),
                                          mask_seeds=seeds, train_encoder=self.encoder_trains(step), **extra)
        total = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets).to(world.device), frame_lengths,
                           target_lengths.to(world.device), blank=self.vocab.blank, reduction="sum",
                           zero_infinity=True)
        n_chars = world.sum(target_lengths.sum().float().to(world.device))
        loss = world.size * total / n_chars
        return {"loss": loss, "ctc_per_char": world.sum(total.detach() / n_chars), "loss_count": n_chars}

    @torch.no_grad()
    def evaluate(self, utterances: list, world: World) -> dict[str, float]:
        result = evaluate_model(self.model, utterances, device=world.device)
        self.model.train()
        return {"dev_wer": result.wer, "dev_cer": result.cer}

    def before_step(self, step: int) -> bool:
        """Whether the encoder's parameters update at this step (``False`` during frozen warm-up)."""
        return self.encoder_trains(step)
