"""Selective fine-tuning: replace the self-attention of chosen layers with fresh mixers, train only those.

See :func:`replace_attention`. Hugging Face models need the optional extra ``streamssl[hf]``.
"""

from streamssl.selective.layers import LAYER_OPTIONS, build_layer_mixer, parse_layers
from streamssl.selective.replace import Replacement, count_parameters, replace_attention, trainable_modules_summary

__all__ = ["LAYER_OPTIONS", "Replacement", "build_layer_mixer", "count_parameters", "parse_layers",
           "replace_attention", "trainable_modules_summary"]
