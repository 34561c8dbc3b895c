"""Frontends, found by name in :data:`FRONTENDS`. Importing a frontend's module registers it."""

from streamssl.frontends.base import (FRONTENDS, FeatureAugment, FrameGeometry, Frontend, build_frontend,
                                      frontend_class, register_frontend)
from streamssl.frontends import conv  # noqa: F401  (registers conv)
from streamssl.frontends import fbank  # noqa: F401  (registers fbank)
from streamssl.frontends import none  # noqa: F401  (registers none)

__all__ = ["FRONTENDS", "FeatureAugment", "FrameGeometry", "Frontend", "build_frontend", "frontend_class",
           "register_frontend"]
