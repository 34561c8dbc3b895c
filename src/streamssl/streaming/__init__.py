"""Streaming recognition: the batched streaming core, the :class:`Recognizer`, real-time pacing, and latency
reports."""

from streamssl.streaming.engine import StreamingEngine, decoder_factory
from streamssl.streaming.recognizer import Recognizer, Stream, Token, Transcript, Update, Word

__all__ = ["Recognizer", "Stream", "StreamingEngine", "Token", "Transcript", "Update", "Word", "decoder_factory"]
