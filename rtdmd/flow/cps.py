"""Coefficient-preserving sampling (CPS) and its transition log-probability (rtdmd_method.md §3.2, §5.3).

One CPS step from level ``sigma`` to ``sigma_next`` with stochasticity ``eta`` (angle
``theta = eta * pi / 2``), given a velocity ``v`` at ``x``::

    x0_hat  = x - sigma v,    eps_hat = x + (1 - sigma) v
    mean    = (1 - sigma_next) x0_hat + sigma_next cos(theta) eps_hat
    std     = sigma_next sin(theta)
    x_next  = mean + std z,   z ~ N(0, I)

If ``x0_hat, eps_hat`` were the true ``(x0, eps)``, then ``x_next | x0 ~ N((1 - sigma_next) x0,
sigma_next^2 I)`` for every ``eta``: the flow path's marginals are preserved. ``eta = 0`` is the
Euler step; ``sigma_next = 0`` returns ``x0_hat`` for every ``eta``. Half-precision inputs are
upcast: the maths runs in float32 at least (float64 inputs stay float64), and exact log-densities
always in float64 (see :func:`gaussian_log_prob`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rtdmd.flow.path import eps_from_velocity, expand_sigma, upcast, x0_from_velocity


def eta_angle(eta: float) -> tuple[float, float]:
    """``(cos(eta pi / 2), sin(eta pi / 2))``; eta = 0.9 gives (0.15643, 0.98769)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    theta = eta * math.pi / 2
    return math.cos(theta), math.sin(theta)


def cps_mean_std(
    x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the CPS transition ``x -> x_next``.

    ``std`` has the shape of ``sigma_next`` broadcast against ``x`` (``[B, 1, ..., 1]`` or 0-d).
    """
    x, v = upcast(x), upcast(v)
    cos, sin = eta_angle(eta)
    s_next = expand_sigma(sigma_next, x)
    x0_hat = x0_from_velocity(x, v, sigma)
    eps_hat = eps_from_velocity(x, v, sigma)
    mean = (1 - s_next) * x0_hat + (s_next * cos) * eps_hat
    std = torch.as_tensor(s_next * sin, dtype=x.dtype, device=x.device)
    return mean, std


def cps_step(
    x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, eta: float, noise: Tensor
) -> Tensor:
    """One CPS step with external noise ``noise ~ N(0, I)``: ``mean + std * noise``.

    Feeding the same ``noise`` to two calls gives identical injected noise, which is what the
    shared-noise projections of AC-DMD rely on.
    """
    mean, std = cps_mean_std(x, v, sigma, sigma_next, eta)
    return mean + std * upcast(noise)


def euler_step(x: Tensor, v: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Deterministic flow-ODE Euler step ``x + (sigma_next - sigma) v``; CPS at eta = 0."""
    x, v = upcast(x), upcast(v)
    return x + (expand_sigma(sigma_next, x) - expand_sigma(sigma, x)) * v


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Exact log-density of ``x_next`` under ``N(mean, std^2 I)``, summed over all but the batch dim.

    ``log p = -||x_next - mean||^2 / (2 std^2) - N log std - (N/2) log(2 pi)``, shape ``[B]``.

    Computed in float64: for a latent of N ~ 1e5 elements the value is ~1e5 in magnitude, and PPO
    needs differences of it accurate to ~1e-6, which float32 (ulp ~ 1e-2 there) cannot give.
    Deterministic transitions (``std = 0``) have no density; they get log-prob 0 by convention.
    """
    diff = (x_next.double() - mean.double()).flatten(1)
    n = diff.shape[1]
    std = torch.as_tensor(std, dtype=torch.float64, device=diff.device).reshape(-1)
    std = std.expand(diff.shape[0]) if std.numel() == 1 else std
    deterministic = std == 0
    safe = torch.where(deterministic, torch.ones_like(std), std)
    logp = -diff.pow(2).sum(1) / (2 * safe**2) - n * torch.log(safe) - 0.5 * n * math.log(2 * math.pi)
    return torch.where(deterministic, torch.zeros_like(logp), logp)


def simplified_log_prob(x_next: Tensor, mean: Tensor) -> Tensor:
    """The official RTDMD/CPS surrogate ``-mean((x_next - mean)^2)`` over all but the batch dim, ``[B]``.

    It drops the variance scaling and the constants and replaces the sum by a mean, so it is finite
    at ``std = 0``; PPO ratios built from it stay within ~1e-5 of 1 (hence clip range 1e-5).
    """
    return -(upcast(x_next) - upcast(mean)).pow(2).flatten(1).mean(1)
