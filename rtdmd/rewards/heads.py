"""The linear head shared by the LAION aesthetic predictor and ImageReward."""

from __future__ import annotations

from torch import nn


def linear_head(in_features: int) -> nn.Sequential:
    """``in -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts 0.2, 0.2, 0.1 after the first three
    layers and no activations (both releases comment their ReLUs out): an affine map in eval mode.
    The indices match the released state dicts (``layers.{0,2,4,6,7}``): ImageReward's ``mlp`` is
    the aesthetic predictor's design on BLIP's 768-wide text [CLS] feature."""
    return nn.Sequential(
        nn.Linear(in_features, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
