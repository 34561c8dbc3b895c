"""Hyperparameters of the two training tasks, as dataclasses that round-trip through YAML.

A run is described by one YAML file whose top-level keys are the fields of :class:`PretrainConfig`
or :class:`FinetuneConfig`; the ``encoder`` key holds :class:`~streamssl.EncoderConfig` fields.
Unknown keys and impossible values raise ``ValueError`` before any data is read or any weight is made.

The defaults are the wav2vec 2.0 BASE values (Baevski et al., 2020, and its released configs) where
the paper has one; fields marked *(ours)* have no BASE counterpart. :data:`PRESETS` holds small
settings that train on a CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamssl.config import EncoderConfig
from streamssl.mixers import MIXERS
from streamssl.objectives import OBJECTIVES, Wav2Vec2Options
from streamssl.train.augment import AugmentOptions


def _encoder_from(value: Any) -> EncoderConfig | None:
    if value is None or isinstance(value, EncoderConfig):
        return value
    if isinstance(value, dict):
        return EncoderConfig.from_dict(value)
    raise ValueError(f"encoder must be a mapping of EncoderConfig fields, got {type(value).__name__}")


@dataclass
class VocabOptions:
    """The ``vocab`` mapping of a fine-tuning run: ``kind`` ``characters`` (default) or ``sentencepiece``
    (``size`` pieces, ``<unk>`` included, of a ``model_type`` ``unigram`` or ``bpe`` model trained on the
    training transcripts when the run starts, and saved in its checkpoint)."""

    kind: str = "characters"
    size: int = 256
    model_type: str = "unigram"

    def __post_init__(self) -> None:
        if self.kind not in ("characters", "sentencepiece"):
            raise ValueError(f"vocab.kind must be 'characters' or 'sentencepiece', got {self.kind!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 2:
            raise ValueError(f"vocab.size must be an integer of at least 2, got {self.size!r}")
        if self.model_type not in ("unigram", "bpe"):
            raise ValueError(f"vocab.model_type must be 'unigram' or 'bpe', got {self.model_type!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VocabOptions":
        if not isinstance(data, dict):
            raise ValueError(f"vocab must be a mapping (e.g. {{kind: sentencepiece, size: 256}}), "
                             f"got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"vocab has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class RunConfig:
    """Fields shared by every training task: data, optimisation, schedule, bookkeeping."""

    train_data: str | None = None      # manifest (.jsonl), LibriSpeech or audio+txt folder, Lhotse cuts or Shar
    dev_data: str | None = None        # evaluated every ``eval_every`` steps (skipped if unset)
    skip_bad: bool = False             # skip (and report) utterances that fail ``corpus check``
    steps: int = 400_000               # optimiser updates in the whole run
    max_batch_seconds: float = 87.5    # audio per batch per process (BASE: 1.4 M samples per GPU)
    crop_seconds: float | None = 15.6  # random crop of longer utterances (BASE: 250 k samples)
    lr: float = 5e-4
    warmup_steps: int = 32_000
    hold_steps: int = 0                # steps at the peak rate after warm-up (ours: 0 = plain linear decay)
    final_lr_ratio: float = 0.0        # the rate decays linearly to ``lr * final_lr_ratio``
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 0.0             # max gradient norm; 0 disables clipping
    seed: int = 0
    num_workers: int = 0               # DataLoader worker processes
    log_every: int = 50                # steps between CSV/TensorBoard rows
    save_every: int = 1000             # steps between checkpoints (one is always written at the end)
    eval_every: int = 0                # steps between dev evaluations (0: only at the end)
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentOptions fields (streamssl.train.augment)
    normalizer_utterances: int = 300   # training utterances a fresh frontend's global statistics come from
    # Memory options (ours). grad_accum_steps: batches per optimiser update (each of max_batch_seconds), the
    # same update as one batch of all of them; activation_checkpointing: recompute each block's activations
    # in backward instead of keeping them (streamssl.mixers.checkpoint_blocks).
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False
    num_buckets: int = 30              # duration buckets of Lhotse's sampler (Lhotse data only; 1: none)

    def validate(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{type(self).__name__}.{what}")

        for name in ("steps", "log_every", "save_every", "normalizer_utterances", "grad_accum_steps", "num_buckets"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "hold_steps", "eval_every", "num_workers"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        check(self.max_batch_seconds > 0, f"max_batch_seconds must be positive, got {self.max_batch_seconds}")
        check(self.crop_seconds is None or self.crop_seconds > 0,
              f"crop_seconds must be positive or null, got {self.crop_seconds}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(0.0 <= self.final_lr_ratio <= 1.0, f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        check(self.weight_decay >= 0, f"weight_decay must be non-negative, got {self.weight_decay}")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam betas must be in [0, 1)")
        check(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        check(self.grad_clip >= 0, f"grad_clip must be non-negative, got {self.grad_clip}")
        check(isinstance(self.activation_checkpointing, bool),
              f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        if not isinstance(self.augment, dict):
            raise ValueError(f"{type(self).__name__}.augment must be a mapping of augmentation settings, "
                             f"got {type(self.augment).__name__}")
        try:
            self.augment_options()
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}.{error}") from None

    def augment_options(self) -> AugmentOptions:
        return AugmentOptions.from_dict(self.augment)

    # -------------------------------------------------------------- dict / YAML
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, EncoderConfig) else value
        return out

    @classmethod
    def layered(cls, lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
        """The fields of ``upper`` over those of ``lower`` (a ``--config`` file over a preset, say); the
        ``encoder`` mappings merge key by key."""
        values = {**lower, **upper}
        if isinstance(lower.get("encoder"), dict) and isinstance(upper.get("encoder"), dict):
            values["encoder"] = {**lower["encoder"], **upper["encoder"]}
        return values

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "RunConfig | None" = None):
        """Build from ``data``; fields it lacks come from ``base`` (or the defaults)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
        values = cls.layered(base.to_dict() if base is not None else {}, data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path, base: "RunConfig | None" = None):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        try:
            return cls.from_dict(data, base)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


DEFAULT_OBJECTIVE = "wav2vec2"
# Before objective_options held every objective's options, wav2vec 2.0's were top-level PretrainConfig fields.
LEGACY_WAV2VEC2_FIELDS = tuple(f.name for f in dataclasses.fields(Wav2Vec2Options))


def _options_in_their_home(data: dict[str, Any], objective: Any) -> dict[str, Any]:
    """``data`` (one layer of PretrainConfig fields) with the top-level wav2vec 2.0 fields of the older
    layout moved into ``objective_options``.

    Under another ``objective`` those fields were never read: a whole configuration saved in the older
    layout (it holds every one of them) loads without them; a layer that sets only some is a ``ValueError``
    naming them, so that ``--set mask_prob=0.3`` under ``bestrq`` is never silently unused.
    """
    legacy = {k: data[k] for k in LEGACY_WAV2VEC2_FIELDS if k in data}
    if not legacy:
        return data
    rest = {k: v for k, v in data.items() if k not in legacy}
    if objective != "wav2vec2":
        if len(legacy) == len(LEGACY_WAV2VEC2_FIELDS):
            return rest
        raise ValueError(f"PretrainConfig has no field(s) {sorted(legacy)}: the options of objective {objective!r} "
                         f"go in objective_options (e.g. --set objective_options.{sorted(legacy)[0]}=...)")
    options = data.get("objective_options") or {}
    if not isinstance(options, dict):
        return rest  # validate() names the bad mapping
    clash = sorted(k for k in legacy if k in options and options[k] != legacy[k])
    if clash:
        raise ValueError(f"PretrainConfig: {clash} given both as top-level fields and in objective_options, "
                         "with different values; give them in objective_options only")
    return {**rest, "objective_options": {**legacy, **options}}


@dataclass
class PretrainConfig(RunConfig):
    """Self-supervised pretraining of an encoder (docs/methods.md sections 1-2 give the encoder).

    ``objective``: a name in :data:`streamssl.objectives.OBJECTIVES`: ``wav2vec2`` (the default) or
    ``bestrq``. ``objective_options``: that objective's options, the one place for them whatever the
    objective (fields of :class:`~streamssl.objectives.Wav2Vec2Options` or
    :class:`~streamssl.objectives.BestRQOptions`); the objective validates them, an option it does not read
    is an error, and after construction the mapping holds every option, defaults included.

    Configurations of the older layout, whose wav2vec 2.0 options were top-level fields (``mask_prob``,
    ``num_negatives``, ...), still load: :meth:`from_dict` moves those fields into ``objective_options``.
    A layer on top of another (:meth:`layered`: a file over a preset, ``--set`` over a file) merges its
    ``objective_options`` into the lower one's when both name the same objective, and replaces them when it
    changes the objective.
    """

    encoder: EncoderConfig | None = None   # None: EncoderConfig.base()
    objective: str = DEFAULT_OBJECTIVE
    objective_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.encoder = _encoder_from(self.encoder) or EncoderConfig.base()
        if self.objective_options is None:
            self.objective_options = {}
        self.validate()
        # Every option spelt out: config.yaml shows what the run used, and a resumed run compares equal.
        self.objective_options = dataclasses.asdict(self.parsed_objective_options())

    @classmethod
    def layered(cls, lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
        below = lower.get("objective", DEFAULT_OBJECTIVE)
        objective = upper.get("objective", below)
        lower = _options_in_their_home(lower, below)
        upper = _options_in_their_home(upper, objective)
        values = super().layered(lower, upper)
        if objective != below:
            # The lower layer's options were another objective's.
            values["objective_options"] = upper.get("objective_options", {})
        elif isinstance(lower.get("objective_options"), dict) and isinstance(upper.get("objective_options"), dict):
            values["objective_options"] = {**lower["objective_options"], **upper["objective_options"]}
        return values

    def parsed_objective_options(self) -> Any:
        """The options dataclass of ``objective`` built from ``objective_options``."""
        return OBJECTIVES[self.objective].parse_options(self.objective_options)

    def validate(self) -> None:
        super().validate()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"PretrainConfig.objective: unknown objective {self.objective!r}; "
                             f"registered objectives: {sorted(OBJECTIVES)}")
        if not isinstance(self.objective_options, dict):
            raise ValueError(f"PretrainConfig.objective_options must be a mapping, got "
                             f"{type(self.objective_options).__name__}")
        try:
            self.parsed_objective_options()
        except ValueError as error:
            raise ValueError(f"PretrainConfig.objective_options: {error}") from None
        if self.augment_options().spec_augment:
            raise ValueError("PretrainConfig.augment: SpecAugment (spec_freq_masks, spec_time_masks) is for "
                             "fine-tuning; the wav2vec 2.0 objective masks spans itself and quantises the "
                             "features SpecAugment would mask")


HEADS = ("linear", "lstm")
TRAIN_MODES = ("full", "frozen", "replace")


def check_train_mode(train_mode: str, replace_layers: str | None, replace_mixer: str,
                     replace_options: dict[str, Any]) -> None:
    """``ValueError`` for an impossible combination of the ``FinetuneConfig`` selective fields."""
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"FinetuneConfig.train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
    if train_mode == "replace" and not replace_layers:
        raise ValueError("FinetuneConfig.train_mode 'replace' needs replace_layers (e.g. 'last:4')")
    if train_mode != "replace" and replace_layers:
        raise ValueError(f"FinetuneConfig.replace_layers is set but train_mode is {train_mode!r}; "
                         "use train_mode 'replace' (--replace)")
    if replace_mixer not in MIXERS:
        raise ValueError(f"FinetuneConfig.replace_mixer: unknown mixer {replace_mixer!r}; "
                         f"registered mixers: {sorted(MIXERS)}")
    if not isinstance(replace_options, dict):
        raise ValueError(f"FinetuneConfig.replace_options must be a mapping, got {type(replace_options).__name__}")


@dataclass
class FinetuneConfig(RunConfig):
    """CTC fine-tuning over characters, or sentencepiece pieces (``vocab``). Defaults follow wav2vec 2.0 BASE fine-tuned on 100 h
    (peak lr 3e-5, 80 k updates, 10 % warm-up and 40 % hold, 3.2 M samples per batch in all, time masks
    of 10 frames at p = 0.65, frontend frozen). A BASE-size encoder needs an ``init`` checkpoint.

    ``init``: a ``streamssl pretrain`` (or ``finetune``) checkpoint whose encoder starts the model;
    ``None`` trains from scratch with ``encoder`` (default: the BASE configuration). Other sources are
    resolved by :data:`streamssl.train.sources.INIT_SOURCES`, e.g. ``hf:DIR`` for a Hugging Face model.
    ``head``: ``linear`` (one projection) or ``lstm`` (``lstm_layers`` of ``lstm_hidden`` units, then a
    projection); ``bidirectional`` is allowed only on an encoder that cannot stream anyway (``full``).
    ``train_mode``: ``full``, ``frozen`` (only the head trains) or ``replace`` (the attention of
    ``replace_layers``, e.g. ``last:4``, becomes fresh ``replace_mixer`` layers with ``replace_options``;
    they and the head train): see :mod:`streamssl.selective.finetune`.
    ``freeze_encoder_steps``: the first steps train only the head. ``freeze_frontend``: keep the
    frontend fixed (``None``: the frontend's own default when starting from ``init``: the waveform ``conv``
    frontend and Hugging Face encoders frozen, ``fbank`` trained; always trained from scratch).
    """

    encoder: EncoderConfig | None = None
    init: str | None = None
    head: str = "linear"
    lstm_hidden: int = 320
    lstm_layers: int = 1
    bidirectional: bool = False
    mask_prob: float = 0.65
    mask_length: int = 10
    freeze_encoder_steps: int = 0
    freeze_frontend: bool | None = None
    # Selective fine-tuning (streamssl.selective.finetune): "full", "frozen" or "replace".
    train_mode: str = "full"
    replace_layers: str | None = None
    replace_mixer: str = "wsm"
    replace_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 80_000
    lr: float = 3e-5
    warmup_steps: int = 8_000
    hold_steps: int = 32_000
    final_lr_ratio: float = 0.05
    max_batch_seconds: float = 200.0
    crop_seconds: float | None = None    # never crop: the transcript covers the whole utterance
    weight_decay: float = 0.0
    vocab: dict[str, Any] = field(default_factory=dict)  # VocabOptions fields; empty: characters

    def __post_init__(self) -> None:
        self.encoder = _encoder_from(self.encoder)
        if self.encoder is None and self.init is None:
            self.encoder = EncoderConfig.base()
        self.validate()

    def validate(self) -> None:
        super().validate()
        if self.init is not None and self.encoder is not None:
            raise ValueError("FinetuneConfig: give either init (the encoder comes from that checkpoint) "
                             "or encoder (training from scratch), not both")
        if self.head not in HEADS:
            raise ValueError(f"FinetuneConfig.head must be one of {HEADS}, got {self.head!r}")
        if self.bidirectional and self.head != "lstm":
            raise ValueError("FinetuneConfig.bidirectional needs head: lstm")
        for name in ("lstm_hidden", "lstm_layers", "mask_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FinetuneConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"FinetuneConfig.mask_prob must be in [0, 1), got {self.mask_prob}")
        if not isinstance(self.freeze_encoder_steps, int) or self.freeze_encoder_steps < 0:
            raise ValueError(f"FinetuneConfig.freeze_encoder_steps must be a non-negative integer, "
                             f"got {self.freeze_encoder_steps!r}")
        if self.crop_seconds is not None:
            raise ValueError("FinetuneConfig.crop_seconds must be null: a crop would cut the transcript")
        try:
            self.vocab_options()
        except ValueError as error:
            raise ValueError(f"FinetuneConfig.{error}") from None
        check_train_mode(self.train_mode, self.replace_layers, self.replace_mixer, self.replace_options)

    def vocab_options(self) -> VocabOptions:
        return VocabOptions.from_dict(self.vocab)


def _cpu_encoder(**overrides: Any) -> dict[str, Any]:
    """A small LLSA encoder that trains on a CPU in minutes (ours)."""
    values = dict(frontend="conv", frontend_options={"channels": 32}, d_model=96, n_layers=3, n_heads=4,
                  ffn_dim=192, dropout=0.0, pos_conv_kernel=16, pos_conv_groups=8, mixer="llsa",
                  left_frames=32, right_frames=4)
    values.update(overrides)
    return values


def _cpu_schedule(steps: int, lr: float, max_batch_seconds: float = 8.0) -> dict[str, Any]:
    return dict(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), max_batch_seconds=max_batch_seconds,
                log_every=10, save_every=100, eval_every=0, weight_decay=0.01, grad_clip=5.0)


# Named starting points for ``--preset``; a ``--config`` file and ``--set`` flags override them. Each setting's
# measurements are in docs/results.md ("Presets: how the CPU settings were chosen").
# cpu-small (ours) is what ``streamssl demo`` trains in its 15-minute budget on two CPU cores: an LLSA encoder
# on the fbank frontend (40 ms frames; declared look-ahead 15 ms + 2 frames = 95 ms).
_DEMO_ENCODER = dict(frontend="fbank", frontend_options={"subsampling": 4, "channels": 144}, d_model=144,
                     n_layers=4, n_heads=4, ffn_dim=576, dropout=0.0, pos_conv_kernel=16, pos_conv_groups=8,
                     mixer="llsa", left_frames=32, right_frames=2)
_DEMO_SCHEDULE = dict(lr=2e-3, max_batch_seconds=20.0, log_every=25, save_every=250, eval_every=0,
                      weight_decay=0.01, grad_clip=5.0, hold_steps=0, final_lr_ratio=0.05)
# wav2vec 2.0 on log-mel at CPU scale: spans of 2 frames, 50 distractors, a small quantiser.
_CPU_WAV2VEC2 = dict(mask_prob=0.5, mask_length=2, num_negatives=50, codebook_groups=2, codebook_entries=64,
                     final_dim=64, gumbel_decay=0.995, diversity_weight=0.1, feature_grad_scale=0.1)
_TINY_WAV2VEC2 = dict(mask_prob=0.5, mask_length=2, num_negatives=5, codebook_entries=8, final_dim=16,
                      feature_grad_scale=1.0)
# cpu-fbank-* (ours): a 3 x 96 LLSA encoder on the fbank frontend (20 ms frames).
_FBANK_ENCODER = _cpu_encoder(frontend="fbank", frontend_options={"channels": 96, "subsampling": 2})
_FBANK_PRETRAIN = dict(encoder=_FBANK_ENCODER, **_cpu_schedule(3000, 2e-3), crop_seconds=2.0,
                       normalizer_utterances=300)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pretrain": {
        "base": {},
        "cpu-small": dict(encoder=_DEMO_ENCODER, **_DEMO_SCHEDULE, steps=300, warmup_steps=30, crop_seconds=4.0,
                          objective_options=_CPU_WAV2VEC2),
        "tiny": dict(encoder=EncoderConfig.tiny(mixer="llsa").to_dict(), **_cpu_schedule(4, 1e-3, 4.0),
                     crop_seconds=2.0, objective_options=_TINY_WAV2VEC2),
        "cpu-fbank-wav2vec2": dict(**_FBANK_PRETRAIN, objective_options=_CPU_WAV2VEC2),
        "cpu-fbank-bestrq": dict(**_FBANK_PRETRAIN, objective="bestrq",
                                 objective_options=dict(codebook_entries=1024, codebook_dim=16, mask_prob=0.5,
                                                        mask_length=2, noise_std=0.1)),
        "tiny-fbank": dict(encoder=EncoderConfig.tiny(frontend="fbank", mixer="llsa").to_dict(),
                           **_cpu_schedule(4, 1e-3, 4.0), crop_seconds=2.0, objective_options=_TINY_WAV2VEC2,
                           normalizer_utterances=8),
        "tiny-bestrq": dict(encoder=EncoderConfig.tiny(frontend="fbank", mixer="llsa").to_dict(),
                            **_cpu_schedule(4, 1e-3, 4.0), crop_seconds=2.0, objective="bestrq",
                            objective_options=dict(codebook_entries=16, mask_prob=0.4, mask_length=2),
                            normalizer_utterances=8),
    },
    "finetune": {
        "base": {},
        "cpu-small": dict(encoder=_DEMO_ENCODER, **_DEMO_SCHEDULE, steps=1500, warmup_steps=150, head="linear",
                          mask_prob=0.05, mask_length=3, freeze_frontend=False,
                          augment={"speed_factors": [0.9, 1.0, 1.1]}),
        "cpu-fbank": dict(encoder=_FBANK_ENCODER, head="linear", mask_prob=0.05, mask_length=2,
                          final_lr_ratio=0.05, hold_steps=0, **_cpu_schedule(1500, 1e-3)),
        "tiny": dict(encoder=EncoderConfig.tiny(mixer="llsa").to_dict(), head="linear", mask_prob=0.1,
                     mask_length=2, **_cpu_schedule(4, 1e-3, 4.0)),
    },
}


def preset(kind: str, name: str) -> RunConfig:
    """The named starting configuration of ``kind`` (``"pretrain"`` or ``"finetune"``)."""
    cls = PretrainConfig if kind == "pretrain" else FinetuneConfig
    if name not in PRESETS[kind]:
        raise ValueError(f"unknown {kind} preset {name!r}; presets: {sorted(PRESETS[kind])}")
    return cls.from_dict(PRESETS[kind][name])
