"""AC-DMD's fake-score objective: the ambient target, its weighting, the consistency regulariser
(rtdmd_method.md §4.2.3-4.2.4). Pure functions of tensors; per-sample ``s``, ``t`` are ``[B]``."""

from __future__ import annotations

import torch
from torch import Tensor

from rtdmd.flow.path import expand_sigma, renoise_coefficients, upcast


def ambient_target(x_s: Tensor, eps: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
    """Ambient denoising-score-matching velocity target for ``x_t = a x_s + sigma_ts eps``::

        v* = -x_s / (1 - s) + [(t + (1 - t) s^2 / (1 - s)^2) / sigma_ts] eps

    Its implied clean prediction ``x_t - t v*`` equals ``(lambda_t^2 y_s - lambda_s^2 y_t) /
    (lambda_t^2 - lambda_s^2)`` with ``y = x / (1 - sigma)``, ``lambda = sigma / (1 - sigma)``, whose
    expectation given ``x_t`` is ``E[x0 | x_t]``. At ``s = 0`` it is the usual ``eps - x0``.
    """
    s_, t_ = expand_sigma(s, x_s), expand_sigma(t, x_s)
    _, sigma_ts = renoise_coefficients(s_, t_)
    return -x_s / (1 - s_) + ((t_ + (1 - t_) * s_**2 / (1 - s_) ** 2) / sigma_ts) * eps


def ambient_loss(
    v_pred: Tensor,
    v_target: Tensor,
    s: float | Tensor,
    t: float | Tensor,
    weight_clamp: float = 10.0,
    move_scale_out: bool = True,
) -> Tensor:
    """Fake-score regression loss, a scalar.

    ``move_scale_out`` (every official config): ``mean(clamp(1 / sigma_ts^2, 0, c) (sigma_ts v - sigma_ts v*)^2)``,
    element-wise ``min(1, c sigma_ts^2) (v - v*)^2``, which down-weights near-singular sub-intervals
    (``t ~ s``). Otherwise the plain ``mean((v - v*)^2)``. Both have the same minimiser.
    """
    diff = upcast(v_pred) - upcast(v_target)
    if not move_scale_out:
        return diff.pow(2).mean()
    _, sigma_ts = renoise_coefficients(expand_sigma(s, diff), expand_sigma(t, diff))
    weight = torch.clamp(1 / sigma_ts**2, 0, weight_clamp)
    return (weight * (sigma_ts * diff) ** 2).mean()


def consistency_loss(h_1: Tensor, h_2: Tensor, h_anchor: Tensor) -> Tensor:
    """Two-sample estimator of ``||E[h' | x_t] - h_anchor||^2``: ``mean((h_1 - h_a) * (h_2 - h_a))``.

    ``h_1``, ``h_2`` are the fake denoiser at two independent one-step transitions ``x_t -> x_t'``.
    Unbiased (and possibly negative), zero in expectation for a martingale denoiser; with
    deterministic transitions it equals ``mean((h_1 - h_a)^2)``. Mean over all but the batch, then
    over the batch; non-finite per-element products count as 0.
    """
    prod = (upcast(h_1) - upcast(h_anchor)) * (upcast(h_2) - upcast(h_anchor))
    prod = torch.where(torch.isfinite(prod), prod, torch.zeros_like(prod))
    return prod.flatten(1).mean(1).mean()
