"""Self-supervised pretraining: the wav2vec 2.0 objective on any streaming encoder."""

from streamssl.ssl.wav2vec2 import GumbelQuantizer, Wav2Vec2Pretrainer, span_mask, utterance_seed

__all__ = ["GumbelQuantizer", "Wav2Vec2Pretrainer", "span_mask", "utterance_seed"]
