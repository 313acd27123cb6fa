"""Policy-gradient pieces of stage 2 (rtdmd_method.md §5.4-5.5): advantages, the clipped PPO
surrogate, the zero-advantage filter, the reward back-propagation hinge. Pure functions of tensors."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor

ADVANTAGE_EPS = 1e-4  # added to every standard deviation, as the official advantages


def std_population(x: Tensor) -> Tensor:
    """``sqrt(mean((x - mean x)^2))`` (divisor N, numpy's default)."""
    return (x - x.mean()).pow(2).mean().sqrt()


def group_mean(values: Tensor, groups: Sequence[Hashable]) -> Tensor:
    """Each entry replaced by the mean of its group (entries sharing a key in ``groups``)."""
    index: dict[Hashable, int] = {}
    ids = torch.tensor([index.setdefault(g, len(index)) for g in groups], device=values.device)
    sums = torch.zeros(len(index), dtype=values.dtype, device=values.device).index_add_(0, ids, values)
    counts = torch.bincount(ids, minlength=len(index)).to(values.dtype)
    return (sums / counts)[ids]


def group_advantages(
    rewards: Mapping[str, Tensor], weights: Mapping[str, float], groups: Sequence[Hashable], eps: float = ADVANTAGE_EPS
) -> Tensor:
    """Weighted, renormalised group advantages ``[N]`` (float64) of all samples of an epoch::

        A_k(i) = (r_k(i) - mean_{j in group(i)} r_k(j)) / (std_all(r_k) + eps)    for each reward k
        A      = sum_k w_k A_k;    A <- (A - mean A) / (std A + eps)

    ``groups[i]`` keys sample ``i``'s group (its prompt); the std is global over all N samples
    (population std). Every group's advantages sum to 0 and their global std is ~1.
    """
    total = None
    for name, values in rewards.items():
        r = values.double()
        a = (r - group_mean(r, groups)) / (std_population(r) + eps)
        total = weights[name] * a if total is None else total + weights[name] * a
    if total is None:
        raise ValueError("group_advantages needs at least one reward")
    return (total - total.mean()) / (std_population(total) + eps)


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


def reward_hinge(reward: Tensor, margin: float) -> Tensor:
    """Per-sample ``relu(margin - r)``: reward ascent while ``r < margin``, no gradient above it."""
    return torch.relu(margin - reward)
