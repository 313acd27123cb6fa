"""Policy-gradient pieces of stage 2 (rtdmd_method.md §5.5)."""

from __future__ import annotations

import torch
from torch import Tensor


def ppo_clipped_loss(
    log_prob: Tensor, log_prob_old: Tensor, advantage: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """Per-sample clipped surrogate ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, ``[B]``.

    ``r = exp(log_prob - log_prob_old)``. Where clipping binds (``A > 0, r > 1 + clip_high`` or
    ``A < 0, r < 1 - clip_low``) the loss is constant in ``log_prob``, so its gradient is exactly 0.
    """
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantage * ratio
    clipped = -advantage * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped)
