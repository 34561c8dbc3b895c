"""CTC recognition on top of an encoder: the model, greedy decoding, evaluation."""
