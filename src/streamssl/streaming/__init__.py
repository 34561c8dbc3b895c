"""Streaming recognition: the :class:`Recognizer`, real-time pacing, and latency reports."""

from streamssl.streaming.recognizer import Recognizer, Stream, Token, Transcript, Update, Word

__all__ = ["Recognizer", "Stream", "Token", "Transcript", "Update", "Word"]
