"""Backbone adapters, one per model family, registered by name in ``BACKBONES``."""

from rtdmd.backbones import flux1, flux2, sd3, tiny, zimage  # noqa: F401  (register the families)
from rtdmd.backbones.base import BACKBONES, Backbone, BackboneConfig, Cond, build_backbone

__all__ = ["BACKBONES", "Backbone", "BackboneConfig", "Cond", "build_backbone"]
