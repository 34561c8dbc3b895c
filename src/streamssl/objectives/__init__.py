"""Self-supervised objectives, found by name in :data:`OBJECTIVES`."""

from streamssl.objectives.bestrq import BestRQOptions, BestRQPretrainer, RandomProjectionQuantizer

OBJECTIVES = {"bestrq": BestRQPretrainer}

__all__ = ["OBJECTIVES", "BestRQOptions", "BestRQPretrainer", "RandomProjectionQuantizer"]
