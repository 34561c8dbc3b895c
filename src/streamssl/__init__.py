"""streamssl: streaming, low-latency speech transformers and self-supervised speech representation learning."""

from streamssl.config import EncoderConfig
from streamssl.encoder import Encoder, EncoderState
from streamssl.frontends import FRONTENDS
from streamssl.latency import Latency, MeasuredLookahead, measure_lookahead
from streamssl.mixers import MIXERS
from streamssl.streaming import Recognizer

__all__ = ["EncoderConfig", "Encoder", "EncoderState", "FRONTENDS", "Latency", "MeasuredLookahead",
           "measure_lookahead", "MIXERS", "Recognizer"]
__version__ = "0.1.0"
