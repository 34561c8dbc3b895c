"""Speech data: corpus readers, manifests, validation, a synthetic eSpeak NG corpus, datasets and batching."""

from streamssl.data.audio import SAMPLE_RATE, audio_blocks, audio_info, load_audio
from streamssl.data.check import check_corpus
from streamssl.data.dataset import AdditiveNoise, AudioDataset, DurationBatchSampler, collate
from streamssl.data.manifest import Utterance, read_manifest, write_manifest
from streamssl.data.problems import CorpusError, Problem
from streamssl.data.readers import load_utterances
from streamssl.data.synth import synthesize_corpus
from streamssl.data.text import normalize_text, spell_out

__all__ = ["AdditiveNoise", "AudioDataset", "DurationBatchSampler", "collate", "SAMPLE_RATE", "audio_blocks", "audio_info", "load_audio", "check_corpus", "Utterance", "read_manifest",
           "write_manifest", "CorpusError", "Problem", "load_utterances", "synthesize_corpus", "normalize_text",
           "spell_out"]
