"""streamssl: streaming, low-latency speech transformers and self-supervised speech representation learning.

The package exports the core (encoder, configuration, mixers, latency); the recogniser is
:class:`streamssl.streaming.Recognizer`.
"""

from streamssl.config import EncoderConfig
from streamssl.encoder import Encoder, EncoderState
from streamssl.frontends import FRONTENDS
from streamssl.latency import Latency, MeasuredLookahead, measure_lookahead
from streamssl.mixers import MIXERS

__all__ = ["EncoderConfig", "Encoder", "EncoderState", "FRONTENDS", "Latency", "MeasuredLookahead",
           "measure_lookahead", "MIXERS"]
__version__ = "0.1.0"
