"""The torch-free runtime: an exported model (``streamssl export``) run by ONNX Runtime, with its log-mel
frames by kaldi-native-fbank, in numpy. Nothing here imports PyTorch (``tests/test_runtime.py`` checks).

    from streamssl.runtime import OnnxModel
    from streamssl.streaming import Recognizer

    recognizer = Recognizer(OnnxModel("model.onnx"), chunk_ms=40)

The names are imported on first use, so that :mod:`streamssl.runtime.logmel` (which the PyTorch
``fbank`` frontend uses) loads without ONNX Runtime.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"ExportError": "streamssl.runtime.model", "ExportInfo": "streamssl.runtime.model",
            "OnnxModel": "streamssl.runtime.model", "OnnxState": "streamssl.runtime.model",
            "LogMel": "streamssl.runtime.logmel"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'streamssl.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
