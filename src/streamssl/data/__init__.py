"""Speech data: corpus readers, manifests, validation, a synthetic eSpeak NG corpus, datasets and batching.

The names are imported on first use: reading audio (:mod:`streamssl.data.audio`) and normalising text
(:mod:`streamssl.data.text`) need no PyTorch, which the datasets do, and the torch-free runtime reads
audio through this package.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {"SAMPLE_RATE": "audio", "audio_blocks": "audio", "audio_info": "audio", "load_audio": "audio",
            "check_corpus": "check", "AdditiveNoise": "dataset", "AudioDataset": "dataset",
            "DurationBatchSampler": "dataset", "collate": "dataset", "Utterance": "manifest",
            "read_manifest": "manifest", "write_manifest": "manifest", "CorpusError": "problems",
            "Problem": "problems", "load_utterances": "readers", "synthesize_corpus": "synth",
            "normalize_text": "text", "spell_out": "text"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"streamssl.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'streamssl.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
