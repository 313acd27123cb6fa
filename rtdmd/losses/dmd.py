"""Distribution-matching (DMD) generator loss (rtdmd_method.md §4.2.2). Pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from rtdmd.flow.path import upcast


def dmd_direction(x: Tensor, x_real: Tensor, x_fake: Tensor) -> Tensor:
    """Normalised DMD direction ``g = (x_fake - x_real) / mean_{C,H,W} |x - x_real|`` per sample.

    ``x_real`` / ``x_fake`` are the teacher's and the fake score's projections of the renoised
    sample back to ``x``'s level; a zero normaliser (NaN) gives ``g = 0``. Returned detached.
    """
    x, x_real, x_fake = upcast(x.detach()), upcast(x_real), upcast(x_fake)
    norm = (x - x_real).abs().flatten(1).mean(1).view(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num((x_fake - x_real) / norm, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: Tensor, g: Tensor) -> Tensor:
    """``0.5 mean((x - sg(x - g))^2)`` in float64: its gradient w.r.t. ``x`` is ``g / numel``, so
    descending it moves ``x`` along ``-g`` (towards the teacher's projection)."""
    x64 = x.double()
    return 0.5 * (x64 - (x64 - g.double()).detach()).pow(2).mean()
