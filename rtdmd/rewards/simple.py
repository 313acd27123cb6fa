"""Rewards that need no weights: for smoke runs, tests and sanity checks of the RL plumbing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from rtdmd.rewards.base import REWARDS, RewardInfo

# ITU-R BT.601 luma weights
_LUMA = (0.299, 0.587, 0.114)


@REWARDS.register("brightness")
class Brightness:
    """Mean luma ``0.299 R + 0.587 G + 0.114 B`` of the image, in [0, 1]; differentiable."""

    info = RewardInfo(version="1", higher_is_better=True, differentiable=True, units="mean luma in [0, 1]")

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
        r, g, b = images.float().unbind(1)
        return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).flatten(1).mean(1)
