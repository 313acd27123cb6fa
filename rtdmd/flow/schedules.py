"""Step schedules and timestep shifts (rtdmd_method.md §3.1).

A schedule starts from raw times ``u`` in (0, 1] (``u = 1`` is pure noise) and maps them to noise
levels ``sigma`` with the family's shift:

* SD3 / SD3.5: static shift ``sigma = s u / (1 + (s - 1) u)`` (``s = 3``);
* FLUX.1: exponential shift with a resolution-dependent ``mu = m L + b`` (``L`` packed tokens);
* FLUX.2-klein: exponential shift with the empirical ``mu(L, num_steps)``.

A terminal ``sigma = 0`` is appended. All maths is float64; the result is returned as float32,
the dtype the samplers and diffusers' schedulers use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

# The RTDMD few-step generator's raw step list: timesteps 1000, 750, 500, 250 (4 NFE).
RTDMD_TIMESTEPS = (1.0, 0.75, 0.5, 0.25)


def shift_static(u: Tensor, shift: float) -> Tensor:
    """SD3 static shift ``sigma = s u / (1 + (s - 1) u)``."""
    return shift * u / (1 + (shift - 1) * u)


def shift_exponential(u: Tensor, mu: float) -> Tensor:
    """Exponential time shift ``sigma = e^mu / (e^mu + (1/u - 1))``."""
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def shift_linear(u: Tensor, mu: float) -> Tensor:
    """Linear time shift ``sigma = mu / (mu + (1/u - 1))``."""
    return mu / (mu + (1 / u - 1))


def resolution_mu(
    seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """FLUX.1's ``mu = m L + b`` with ``m = (max_shift - base_shift) / (max_seq_len - base_seq_len)``,
    ``b = base_shift - m base_seq_len``; ``L = 1024`` (512 px) gives 0.63, ``L = 4096`` gives 1.15."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return seq_len * m + b


def empirical_mu(seq_len: int, num_steps: int) -> float:
    """FLUX.2-klein's empirical ``mu(L, n)``; ``L = 1024, n = 4`` gives ~2.0307.

    For ``L > 4300``: ``mu = 0.00016927 L + 0.45666666``. Otherwise it interpolates linearly in ``n``
    between the fits for 10 and 200 steps: ``m200 = 0.00016927 L + 0.45666666``,
    ``m10 = 8.73809524e-5 L + 1.89833333``, ``mu = a n + b`` with ``a = (m200 - m10) / 190``,
    ``b = m200 - 200 a``.
    """
    m200 = 0.00016927 * seq_len + 0.45666666
    if seq_len > 4300:
        return m200
    m10 = 8.73809524e-05 * seq_len + 1.89833333
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * num_steps + b


def stretch_to_terminal(sigmas: Tensor, terminal: float) -> Tensor:
    """Rescale ``1 - sigma`` so that the last (non-zero) sigma equals ``terminal``."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def linspace_timesteps(num_steps: int, u_min: float) -> tuple[float, ...]:
    """``num_steps`` raw times evenly spaced from 1 down to ``u_min`` (diffusers' default spacing)."""
    return tuple(torch.linspace(1.0, u_min, num_steps, dtype=torch.float64).tolist()) if num_steps > 1 else (1.0,)


def flux_default_timesteps(num_steps: int, time_shift: TimeShift | None = None) -> tuple[float, ...]:
    """diffusers' FLUX.1 / FLUX.2 spacing ``linspace(1, 1/n, n)`` (independent of the shift)."""
    return linspace_timesteps(num_steps, 1.0 / num_steps)


@dataclass(frozen=True)
class TimeShift:
    """How a family turns raw times into sigmas; built from a diffusers scheduler config.

    ``mu_rule``: ``"none"`` (static shift), ``"resolution"`` (FLUX.1's linear-in-L mu) or
    ``"empirical"`` (FLUX.2-klein's mu(L, n)).
    """

    mu_rule: Literal["none", "resolution", "empirical"] = "none"
    shift: float = 1.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    shift_terminal: float | None = None

    @classmethod
    def from_scheduler_config(
        cls, config: dict[str, Any], dynamic_mu_rule: Literal["resolution", "empirical"], **kw: Any
    ) -> TimeShift:
        """Read a ``FlowMatchEulerDiscreteScheduler`` config; ``dynamic_mu_rule`` applies when it
        sets ``use_dynamic_shifting``."""
        dynamic = bool(config.get("use_dynamic_shifting", False))
        return cls(
            mu_rule=dynamic_mu_rule if dynamic else "none",
            shift=float(config.get("shift", 1.0)),
            base_seq_len=int(config.get("base_image_seq_len", 256)),
            max_seq_len=int(config.get("max_image_seq_len", 4096)),
            base_shift=float(config.get("base_shift", 0.5)),
            max_shift=float(config.get("max_shift", 1.15)),
            time_shift_type=config.get("time_shift_type", "exponential"),
            shift_terminal=config.get("shift_terminal") or None,
            **kw,
        )

    def mu(self, seq_len: int, num_steps: int) -> float | None:
        if self.mu_rule == "resolution":
            return resolution_mu(seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
        if self.mu_rule == "empirical":
            return empirical_mu(seq_len, num_steps)
        return None

    def sigmas(self, timesteps: Sequence[float], seq_len: int) -> Tensor:
        """``[n + 1]`` float32 sigmas (terminal 0 appended) for raw times ``timesteps``."""
        u = torch.tensor(list(timesteps), dtype=torch.float64)
        if u.ndim != 1 or len(u) == 0 or not bool(((u > 0) & (u <= 1)).all()):
            raise ValueError(f"raw timesteps must be a non-empty list in (0, 1], got {list(timesteps)}")
        if len(u) > 1 and not bool((u[1:] < u[:-1]).all()):
            raise ValueError(f"raw timesteps must decrease strictly, got {list(timesteps)}")
        mu = self.mu(seq_len, len(u))
        if mu is None:
            sigma = shift_static(u, self.shift)
        elif self.time_shift_type == "exponential":
            sigma = shift_exponential(u, mu)
        else:
            sigma = shift_linear(u, mu)
        if self.shift_terminal:
            sigma = stretch_to_terminal(sigma, self.shift_terminal)
        return torch.cat([sigma, sigma.new_zeros(1)]).float()
