"""The training pair of both stage-1 losses (rtdmd_method.md §4.2.1): backward simulation of the
generator to a random stop K, the boundary sample ``x_s`` at level ``s``, and its renoised version
``x_t`` at per-sample levels ``t`` (AC-DMD's, or plain DMD's official level tables).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rtdmd.backbones.base import Cond
from rtdmd.flow.path import renoise, x0_from_velocity
from rtdmd.flow.schedules import shift_static
from rtdmd.sampling import rollout, seed_table
from rtdmd.seeding import randint, randn, randn_rows, seed_for, uniform
from rtdmd.train.distill_config import DistillConfig, DMDLevelsSpec, RenoiseSpec
from rtdmd.train.roles import Models


@dataclass
class SubInterval:
    """A generator sample and its renoised version: ``x_s`` at level ``s`` (one per batch, from the
    common stop K), ``x_t = a x_s + sigma_ts eps`` at per-sample levels ``t``."""

    stop: int
    x_s: torch.Tensor
    s: float
    t: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor


def renoise_levels(spec: RenoiseSpec, s: float, seeds: list[int]) -> torch.Tensor:
    """Per-sample ``t = clamp(s + margin + u (1 - s - margin), *clamp)``, ``u ~ U[0, 1)`` from each seed."""
    lo = s + spec.margin
    t = [lo + uniform(seed) * (1 - lo) for seed in seeds]
    return torch.tensor(t, dtype=torch.float32).clamp(*spec.clamp)


def fake_table_level(z: float, spec: DMDLevelsSpec) -> float:
    """``sigma = shift(1 - i / 1000)`` with ``i = min(floor(1000 sigmoid(m + s z)), 999)``: entry ``i``
    of the descending 1000-entry table picked by a logit-normal draw (``z ~ N(0, 1)``)."""
    u = 1 / (1 + math.exp(-(spec.logit_mean + spec.logit_std * z)))
    index = min(math.floor(1000 * u), 999)
    return float(shift_static(1 - index / 1000, spec.table_shift))


def generator_table_level(index: int, spec: DMDLevelsSpec) -> float:
    """``sigma = shift((i + 1) / 1000)``: entry ``i`` of the ascending 1000-entry table."""
    return float(shift_static((index + 1) / 1000, spec.table_shift))


def draw_renoise_levels(cfg: DistillConfig, phase: str, step: int, samples: list[int], s: float) -> torch.Tensor:
    """Per-sample renoising levels: :func:`renoise_levels`, or for plain DMD with ``dmd_levels`` the
    official draws (the fake phase's from :func:`fake_table_level`, the generator's from
    :func:`generator_table_level`)."""
    seeds = [seed_for(cfg.seed, phase, step, i, "t") for i in samples]
    spec = cfg.dmd_levels
    if spec is None:
        return renoise_levels(cfg.renoise, s, seeds)
    if phase == "fake":
        levels = [fake_table_level(float(randn(seed, ())), spec) for seed in seeds]
    else:
        levels = [generator_table_level(randint(seed, *spec.index_range), spec) for seed in seeds]
    return torch.tensor(levels, dtype=torch.float32)


def sample_subinterval(
    cfg: DistillConfig, models: Models, phase: str, step: int, samples: list[int], cond: Cond, grad: bool
) -> SubInterval:
    """Backward simulation to a random stop K and the boundary/renoised pair (§4.2.1)."""
    num_steps = len(models.sigmas) - 1
    stop = randint(seed_for(cfg.seed, phase, step, "stop"), 1, num_steps)
    seeds = seed_table(cfg.seed, [(f"{phase}/{step}", i) for i in samples], num_steps)
    traj = rollout(
        models.backbone,
        models.generator_run,
        cond,
        models.sigmas,
        seeds,
        models.latent_shape,
        eta=cfg.sampler.eta,
        record=False,
        stop=stop,
        grad_last=grad,
    )
    if cfg.method == "ac_dmd":  # the CPS output of the last executed step, at s = sigma_K
        x_s, s = traj.final, float(models.sigmas[stop])
    else:  # plain DMD: the clean prediction of the last executed step
        x_s, s = x0_from_velocity(traj.last_input, traj.last_velocity, float(models.sigmas[stop - 1])), 0.0
    device = x_s.device
    t = draw_renoise_levels(cfg, phase, step, samples, s).to(device)
    eps = randn_rows([seed_for(cfg.seed, phase, step, i, "renoise") for i in samples], models.latent_shape, device)
    x_t = renoise(x_s.detach().float(), s, t, eps)
    return SubInterval(stop=stop, x_s=x_s, s=s, t=t, eps=eps, x_t=x_t)
