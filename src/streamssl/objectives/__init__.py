"""Self-supervised pretraining objectives around any streaming encoder, found by name in :data:`OBJECTIVES`.

Each entry is a module class built as ``cls(encoder_config, options)`` whose ``forward(wave, lengths,
seeds, step, world)`` returns a dict with the ``loss`` and detached metrics.
"""

from streamssl.objectives.wav2vec2 import GumbelQuantizer, OneProcess, Reducer, Wav2Vec2Options, Wav2Vec2Pretrainer

OBJECTIVES: dict[str, type] = {"wav2vec2": Wav2Vec2Pretrainer}

__all__ = ["OBJECTIVES", "GumbelQuantizer", "OneProcess", "Reducer", "Wav2Vec2Options", "Wav2Vec2Pretrainer"]
