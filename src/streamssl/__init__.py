"""streamssl: streaming, low-latency speech transformers and self-supervised speech representation learning.

The package exports the core (encoder, configuration, mixers, latency); the recogniser is
:class:`streamssl.streaming.Recognizer`. The exports are imported on first use, so the command line
answers ``--help`` without loading torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"EncoderConfig": "streamssl.config", "Encoder": "streamssl.encoder",
            "EncoderState": "streamssl.encoder", "FRONTENDS": "streamssl.frontends",
            "Latency": "streamssl.latency", "MeasuredLookahead": "streamssl.latency",
            "measure_lookahead": "streamssl.latency", "MIXERS": "streamssl.mixers"}

__all__ = ["EncoderConfig", "Encoder", "EncoderState", "FRONTENDS", "Latency", "MeasuredLookahead",
           "measure_lookahead", "MIXERS"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'streamssl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
