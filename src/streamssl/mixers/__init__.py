"""Mixer families, found by name in :data:`MIXERS`. Importing a family's module registers it."""

from streamssl.mixers.base import (MIXERS, Block, LayerMixer, LayerStack, MixerStack, build_stack, checkpoint_blocks,
                                   register_mixer)
from streamssl.mixers import attention  # noqa: F401  (registers full, maa, sa, llsa)
from streamssl.mixers import memory  # noqa: F401  (registers amtrf, emformer)
from streamssl.mixers import summary  # noqa: F401  (registers summary, wsm)

__all__ = ["MIXERS", "Block", "LayerMixer", "LayerStack", "MixerStack", "build_stack", "checkpoint_blocks",
           "register_mixer"]
