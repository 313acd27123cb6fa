"""The rectified-flow path and what a velocity prediction implies (rtdmd_method.md §1).

Conventions: clean latent ``x0``, Gaussian ``eps``, noise level ``sigma`` in [0, 1],
``x_sigma = (1 - sigma) x0 + sigma eps``; networks predict the velocity ``v = eps - x0``.
``sigma`` may be a Python float, a 0-d tensor or a per-sample tensor of shape ``[B]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """bf16/fp16 -> float32; float32 and float64 unchanged (the maths runs in at least float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


def renoise_coefficients(
    s: float | Tensor, t: float | Tensor, floor: float = 1e-12
) -> tuple[Tensor | float, Tensor | float]:
    """Forward transition of the path from level ``s`` to a noisier level ``t`` (rtdmd_method.md §4.2.1):
    ``a = (1 - t) / (1 - s)``, ``sigma_ts = sqrt(max(t^2 - a^2 s^2, floor))``.

    Then ``a (1 - s) = 1 - t`` and ``a^2 s^2 + sigma_ts^2 = t^2``: a sample ``(1 - s) x0 + s eps1``
    becomes one at level ``t``.
    """
    a = (1 - t) / (1 - s)
    var = t * t - (a * s) ** 2
    sigma_ts = torch.sqrt(torch.clamp(var, min=floor)) if isinstance(var, Tensor) else max(var, floor) ** 0.5
    return a, sigma_ts


def renoise(x_s: Tensor, s: float | Tensor, t: float | Tensor, eps: Tensor) -> Tensor:
    """ "Ambient" renoising ``x_t = a x_s + sigma_ts eps`` (per-sample ``s``, ``t`` of shape ``[B]`` allowed)."""
    a, sigma_ts = renoise_coefficients(expand_sigma(s, x_s), expand_sigma(t, x_s))
    return a * x_s + sigma_ts * eps
