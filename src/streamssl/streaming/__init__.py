"""Streaming recognition: the batched streaming core, the :class:`Recognizer`, real-time pacing, and latency
reports. None of it imports PyTorch; a PyTorch model brings it along. The names are imported on first use."""

from importlib import import_module
from typing import Any

_EXPORTS = {"StreamingEngine": "engine", "decoder_factory": "engine", "Recognizer": "recognizer",
            "Stream": "engine", "Token": "engine", "Transcript": "engine", "Update": "engine", "Word": "engine"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"streamssl.streaming.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'streamssl.streaming' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
