"""The rectified-flow path and what a velocity prediction implies (rtdmd_method.md §1).

Conventions: clean latent ``x0``, Gaussian ``eps``, noise level ``sigma`` in [0, 1],
``x_sigma = (1 - sigma) x0 + sigma eps``; networks predict the velocity ``v = eps - x0``.
``sigma`` may be a Python float, a 0-d tensor or a per-sample tensor of shape ``[B]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_sigma(sigma: float | Tensor, x: Tensor) -> Tensor | float:
    """Make ``sigma`` broadcast against ``x``: ``[B]`` becomes ``[B, 1, ..., 1]``; scalars pass through."""
    if isinstance(sigma, Tensor) and sigma.ndim == 1:
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
        return sigma.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    if isinstance(sigma, Tensor):
        return sigma.to(x.device)
    return sigma


def noisy(x0: Tensor, eps: Tensor, sigma: float | Tensor) -> Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma eps``."""
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching regression target ``v* = eps - x0``."""
    return eps - x0


def x0_from_velocity(x: Tensor, v: Tensor, sigma: float | Tensor) -> Tensor:
    """Clean prediction ``x0_hat = x - sigma v``."""
    return x - expand_sigma(sigma, x) * v


def eps_from_velocity(x: Tensor, v: Tensor, sigma: float | Tensor) -> Tensor:
    """Noise prediction ``eps_hat = x + (1 - sigma) v``; ``(1 - sigma) x0_hat + sigma eps_hat = x``."""
    return x + (1 - expand_sigma(sigma, x)) * v


def classifier_free_guidance(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """``v_cfg = v_uncond + w (v_cond - v_uncond)``; ``w = 1`` returns ``v_cond``."""
    return v_uncond + scale * (v_cond - v_uncond)


def as_sigma_batch(sigma: float | Tensor, batch: int, device: torch.device | str) -> Tensor:
    """A float32 ``[B]`` tensor of noise levels from a scalar or a ``[B]`` tensor."""
    if isinstance(sigma, Tensor):
        sigma = sigma.to(device=device, dtype=torch.float32)
        return sigma.expand(batch).clone() if sigma.ndim == 0 else sigma
    return torch.full((batch,), float(sigma), device=device, dtype=torch.float32)
