"""The sampling loops: ``generate`` (images) and ``rollout`` (states, means, log-probs per step).

Every method samples through here: a teacher is ``eta = 0`` (flow-ODE Euler) with CFG over many
steps; an RTDMD student is ``eta = 0.9`` CPS over 4 steps with ``guidance = 1``.

Randomness: the initial latent of image ``(prompt_id, sample_index)`` is drawn from
``seed_for(run_seed, prompt_id, sample_index, INIT_STEP)`` and the noise step ``k`` injects from
``seed_for(run_seed, prompt_id, sample_index, k)``.

Batch invariance: ``generate`` runs the networks on fixed-size chunks of ``compute_batch`` rows
(the last chunk padded by repeating its last row). Matrix kernels may round differently for
different batch sizes (on CPU a batch of 1-3 rows differs from 4+ in the last bits), so a fixed
compute shape is what makes an image bit-identical whether it is generated alone, in a batch of 7,
or in any prompt order. Images then depend only on (weights, prompt, coordinates, spec,
compute_batch, device and library versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import Backbone, Cond
from rtdmd.flow.cps import cps_mean_std, euler_step, gaussian_log_prob, simplified_log_prob
from rtdmd.images import to_uint8
from rtdmd.seeding import INIT_STEP, Coord, randn_rows, seed_for


@dataclass(frozen=True)
class SamplerSpec:
    """How to sample: number of steps, CPS stochasticity, guidance, optional raw step times.

    ``timesteps``: raw times ``u`` in (0, 1] before the family's shift, one per step (RTDMD students:
    ``[1.0, 0.75, 0.5, 0.25]``); ``None`` uses the family pipeline's default spacing.

    ``scheduler`` (optional): a deterministic diffusers scheduler class (e.g.
    ``DPMSolverMultistepScheduler`` for TDM) built from ``scheduler_config``; it then defines the
    steps and the update, and ``eta`` / ``timesteps`` must stay unset (0 / null).
    """

    num_steps: int = 4
    eta: float = 0.9
    guidance: float = 1.0
    timesteps: tuple[float, ...] | None = None
    scheduler: str = ""
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.scheduler:
            if self.eta != 0.0 or self.timesteps is not None:
                raise ValueError("a diffusers scheduler defines its own steps: set eta=0 and timesteps=null")
            if "sde" in str(self.scheduler_config.get("algorithm_type", "")):
                raise ValueError(
                    "stochastic diffusers schedulers are not supported (their noise is not addressed by coordinates)"
                )
        elif self.scheduler_config:
            raise ValueError("scheduler_config needs a scheduler")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.timesteps is not None and len(self.timesteps) != self.num_steps:
            raise ValueError(f"timesteps has {len(self.timesteps)} entries for num_steps={self.num_steps}")


@dataclass
class Trajectory:
    """One batch's chain. ``T`` steps; ``states[:, k]`` is ``x`` before step ``k`` and
    ``states[:, T]`` the final sample; step ``k`` drew ``states[:, k+1] ~ N(means[:, k], stds[k]^2)``.

    ``log_probs`` are exact Gaussian transition log-densities (float64; 0 for deterministic steps),
    ``log_probs_simplified`` the official ``-mean((x' - mean)^2)`` surrogate.
    """

    sigmas: Tensor  # [T + 1]
    final: Tensor  # [B, C, h, w], the state after the last executed step
    last_input: Tensor | None = None  # the state the last executed step started from
    last_velocity: Tensor | None = None  # that step's velocity (carries the graph with grad_last)
    states: Tensor | None = None  # [B, T + 1, C, h, w]
    means: Tensor | None = None  # [B, T, C, h, w]
    stds: Tensor | None = None  # [T]
    log_probs: Tensor | None = None  # [B, T]
    log_probs_simplified: Tensor | None = None  # [B, T]


def seed_table(run_seed: int, keys: Sequence[tuple[Coord, int]], num_steps: int) -> list[list[int]]:
    """``[B][num_steps + 1]`` seeds: column 0 for the initial latent, column ``k + 1`` for step ``k``'s noise."""
    return [
        [seed_for(run_seed, prompt_id, sample_index, step) for step in range(INIT_STEP, num_steps)]
        for prompt_id, sample_index in keys
    ]


def rollout(
    backbone: Backbone,
    net: nn.Module,
    cond: Cond,
    sigmas: Tensor,
    seeds: Sequence[Sequence[int]],
    latent_shape: tuple[int, int, int],
    *,
    eta: float,
    guidance: float = 1.0,
    record: bool = True,
    stop: int | None = None,
    grad_last: bool = False,
) -> Trajectory:
    """Run the chain ``x(sigmas[0]) -> x(sigmas[1]) -> ...`` for one batch.

    ``seeds[b][0]`` draws row ``b``'s initial latent, ``seeds[b][k + 1]`` its step-``k`` noise
    (drawn only for stochastic steps: ``eta > 0`` and ``sigma_next > 0``). With ``record`` every
    state, mean and log-prob is kept (RL); otherwise only the final sample (generation).

    ``stop`` executes only the first ``stop`` steps (the generator's random stop K); with
    ``grad_last`` every executed step but the last runs without gradient and the last keeps the
    graph through its velocity (the backward simulation of DMD/AC-DMD: gradient truncation).
    """
    num_steps = len(sigmas) - 1
    stop = num_steps if stop is None else stop
    if not 1 <= stop <= num_steps:
        raise ValueError(f"stop must lie in [1, {num_steps}], got {stop}")
    device = backbone.device
    if len(seeds) != len(cond) or any(len(row) != num_steps + 1 for row in seeds):
        raise ValueError(f"need {len(cond)} seed rows of {num_steps + 1} seeds")
    x = randn_rows([row[0] for row in seeds], latent_shape, device)
    states, means, stds, logps, logps_simple = [x], [], [], [], []
    for k in range(stop):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        last = k == stop - 1
        with torch.set_grad_enabled(grad_last and last):
            v = backbone.velocity(net, x, sigma, cond, guidance)
            if eta == 0.0:
                mean, std = euler_step(x, v, sigma, sigma_next), 0.0
            else:
                mean, std_t = cps_mean_std(x, v, sigma, sigma_next, eta)
                std = float(std_t)  # sigma_next sin(theta): exactly 0 at the final step
            noise = randn_rows([row[k + 1] for row in seeds], latent_shape, device) if std != 0.0 else None
            x_next = mean if noise is None else mean + std * noise
        if record:
            states.append(x_next)
            means.append(mean)
            stds.append(std)
            logps.append(gaussian_log_prob(x_next.detach(), mean.detach(), std))
            logps_simple.append(simplified_log_prob(x_next.detach(), mean.detach()))
        if last:
            last_input, last_velocity = x, v
        x = x_next
    traj = Trajectory(sigmas=sigmas, final=x, last_input=last_input, last_velocity=last_velocity)
    if record:
        traj.states = torch.stack(states, 1)
        traj.means = torch.stack(means, 1)
        traj.stds = torch.tensor(stds, dtype=torch.float32)
        traj.log_probs = torch.stack(logps, 1)
        traj.log_probs_simplified = torch.stack(logps_simple, 1)
    return traj


def scheduler_chain(backbone: Backbone, net: nn.Module, cond: Cond, x: Tensor, spec: SamplerSpec) -> Tensor:
    """Sample with a deterministic diffusers flow scheduler (its own steps and multistep update);
    the model is called at ``sigma = t / num_train_timesteps`` of each scheduler timestep."""
    import diffusers

    scheduler = getattr(diffusers, spec.scheduler)(**spec.scheduler_config)
    scheduler.set_timesteps(spec.num_steps, device=x.device)
    for t in scheduler.timesteps:
        v = backbone.velocity(net, x, float(t) / scheduler.config.num_train_timesteps, cond, spec.guidance)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.float()


class ForwardCounter:
    """Counts the rows a network processes (a forward hook), to measure NFE instead of trusting a card.

    One sampling step costs 1 NFE per image, 2 with classical CFG (both branches are rows).
    """

    def __init__(self, net: nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handle = net.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.rows += int(x.shape[0])

    def close(self) -> None:
        self._handle.remove()


def _padded_chunks(n: int, size: int) -> list[tuple[list[int], int]]:
    """Index lists of exactly ``size`` rows covering ``range(n)``; each with its count of real rows."""
    chunks = []
    for start in range(0, n, size):
        real = list(range(start, min(start + size, n)))
        chunks.append((real + [real[-1]] * (size - len(real)), len(real)))
    return chunks


@torch.no_grad()
def generate(
    backbone: Backbone,
    net: nn.Module,
    prompts: Sequence[str],
    keys: Sequence[tuple[Coord, int]],
    spec: SamplerSpec,
    *,
    run_seed: int,
    height: int,
    width: int,
    compute_batch: int = 4,
    as_uint8: bool = False,
) -> Tensor:
    """Images ``[N, 3, H, W]`` (float32 in [0, 1], on the CPU) for ``prompts[i]`` at coordinates ``keys[i]``.

    ``keys[i] = (prompt_id, sample_index)``. ``as_uint8``: ``[N, H, W, 3]`` uint8 pixels instead
    (:func:`rtdmd.images.to_uint8`, applied on the device: the same values, a quarter of the bytes to copy
    and no per-pixel work on the CPU).
    """
    spec.validate()
    if len(prompts) != len(keys):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys")
    if compute_batch < 1:
        raise ValueError(f"compute_batch must be >= 1, got {compute_batch}")
    shape = backbone.latent_shape(height, width)
    sigmas = None if spec.scheduler else backbone.schedule(spec.num_steps, height, width, spec.timesteps)
    out: list[Tensor] = []
    for rows, real in _padded_chunks(len(prompts), compute_batch):
        cond = backbone.encode([prompts[i] for i in rows], guidance=spec.guidance)
        seeds = seed_table(run_seed, [keys[i] for i in rows], spec.num_steps)
        if spec.scheduler:
            final = scheduler_chain(
                backbone, net, cond, randn_rows([row[0] for row in seeds], shape, backbone.device), spec
            )
        else:
            final = rollout(
                backbone, net, cond, sigmas, seeds, shape, eta=spec.eta, guidance=spec.guidance, record=False
            ).final
        images = backbone.decode(final)[:real]
        out.append((to_uint8(images) if as_uint8 else images).cpu())
    if out:
        return torch.cat(out)
    return torch.empty(0, height, width, 3, dtype=torch.uint8) if as_uint8 else torch.empty(0, 3, height, width)
