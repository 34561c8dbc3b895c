"""Self-supervised pretraining objectives around any streaming encoder, found by name in :data:`OBJECTIVES`.

Each entry is an :class:`Objective` built as ``cls(encoder_config, options)`` whose ``forward(inputs,
lengths, seeds, step, world)`` returns a dict with the ``loss`` and detached metrics (``accuracy``,
``chance``, ``code_perplexity``, ``masked_fraction``, ``code_counts`` among them: see
:mod:`streamssl.train.health`). ``cls.parse_options(dict)`` turns ``PretrainConfig.objective_options``
into the objective's ``Options`` dataclass and raises ``ValueError`` naming an option the objective does
not read or an impossible value; instances have ``codebook_entries``.
"""

from streamssl.objectives.base import Objective, OneProcess, Reducer, code_perplexity
from streamssl.objectives.bestrq import BestRQOptions, BestRQPretrainer, RandomProjectionQuantizer
from streamssl.objectives.wav2vec2 import GumbelQuantizer, Wav2Vec2Options, Wav2Vec2Pretrainer

OBJECTIVES: dict[str, type[Objective]] = {"wav2vec2": Wav2Vec2Pretrainer, "bestrq": BestRQPretrainer}

__all__ = ["OBJECTIVES", "BestRQOptions", "BestRQPretrainer", "GumbelQuantizer", "Objective", "OneProcess",
           "RandomProjectionQuantizer", "Reducer", "Wav2Vec2Options", "Wav2Vec2Pretrainer", "code_perplexity"]
