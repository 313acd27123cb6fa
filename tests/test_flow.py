"""Flow maths: rtdmd_method.md §12 invariants 1 and 4-10, 16, and schedules against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtdmd.backbones import BACKBONES
from rtdmd.backbones.base import reference_schedule
from rtdmd.flow.cps import (
    cps_mean_std,
    cps_step,
    eta_angle,
    euler_step,
    gaussian_log_prob,
    simplified_log_prob,
)
from rtdmd.flow.path import eps_from_velocity, noisy, velocity_target, x0_from_velocity
from rtdmd.flow.schedules import (
    RTDMD_TIMESTEPS,
    TimeShift,
    empirical_mu,
    flux_default_timesteps,
    linspace_timesteps,
    resolution_mu,
)
from rtdmd.losses.grpo import ppo_clipped_loss

ETA = 0.9


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- 1. schedules


@pytest.mark.parametrize(
    ("family", "res", "expected"),
    [
        ("sd3", 512, [1.0, 0.9, 0.75, 0.5]),
        ("sd3", 1024, [1.0, 0.9, 0.75, 0.5]),
        ("flux1", 512, [1.0, 0.8492, 0.6525, 0.3849]),
        ("flux1", 1024, [1.0, 0.9045, 0.7595, 0.5128]),
        ("flux2", 512, [1.0, 0.9581, 0.8840, 0.7175]),
        ("flux2", 1024, [1.0, 0.9674, 0.9081, 0.7672]),
    ],
)
def test_rtdmd_schedules_match_the_method_table(family, res, expected):
    sigmas = reference_schedule(BACKBONES.get(family), 4, res, res, RTDMD_TIMESTEPS)
    assert sigmas[-1] == 0 and sigmas.dtype == torch.float32
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, atol=6e-5)


def test_mu_values():
    assert resolution_mu(1024) == pytest.approx(0.63, abs=1e-12)
    assert resolution_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert empirical_mu(1024, 4) == pytest.approx(2.0307, abs=1e-4)
    assert empirical_mu(5000, 4) == pytest.approx(0.00016927 * 5000 + 0.45666666)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_sd3_static_schedule_equals_diffusers_scheduler(num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(num_steps)
    ours = reference_schedule(BACKBONES.get("sd3"), num_steps, 1024, 1024)
    torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_steps", [4, 50])
@pytest.mark.parametrize("res", [512, 1024, 1536])
def test_flux_dynamic_schedules_equal_diffusers_scheduler(num_steps, res):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    seq_len = (res // 16) ** 2
    u = np.linspace(1.0, 1 / num_steps, num_steps)
    for family, mu in [("flux1", calculate_shift(seq_len)), ("flux2", compute_empirical_mu(seq_len, num_steps))]:
        ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
        ref.set_timesteps(sigmas=u, mu=mu)
        ours = reference_schedule(BACKBONES.get(family), num_steps, res, res)
        torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=2e-6)


def test_shift_terminal_and_linear_shift_equal_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for kind in ("exponential", "linear"):
        ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.02, time_shift_type=kind)
        ref.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=resolution_mu(1674))
        ours = TimeShift.from_scheduler_config(dict(ref.config), dynamic_mu_rule="resolution")
        torch.testing.assert_close(
            ours.sigmas(linspace_timesteps(4, 0.25), seq_len=1674), ref.sigmas, rtol=0, atol=2e-6
        )
        assert float(ours.sigmas([1.0, 0.5], seq_len=1674)[-2]) == pytest.approx(0.02)


def test_schedule_rejects_bad_raw_times():
    shift = TimeShift(shift=3.0)
    for bad in ([], [0.5, 0.75], [1.2, 0.5], [1.0, 0.0]):
        with pytest.raises(ValueError):
            shift.sigmas(bad, seq_len=16)
    assert flux_default_timesteps(4) == pytest.approx((1.0, 0.75, 0.5, 0.25))


# ---------------------------------------------------------------- 4-8. CPS


def test_x0_eps_recovery_identity():
    x, v = rand(3, 4, 8, 8), rand(3, 4, 8, 8, seed=1)
    sigma = torch.tensor([0.1, 0.5, 0.97], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(
        (1 - s) * x0_from_velocity(x, v, sigma) + s * eps_from_velocity(x, v, sigma), x, rtol=0, atol=1e-12
    )
    x0, eps = rand(2, 3, seed=2), rand(2, 3, seed=3)
    xt = noisy(x0, eps, 0.3)
    torch.testing.assert_close(x0_from_velocity(xt, velocity_target(x0, eps), 0.3), x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eta_zero_is_the_euler_step(dtype):
    x, v = rand(2, 4, 8, 8, dtype=dtype), rand(2, 4, 8, 8, seed=1, dtype=dtype)
    for sigma, sigma_next in [(1.0, 0.75), (0.9, 0.5), (0.5, 0.0)]:
        mean, std = cps_mean_std(x, v, sigma, sigma_next, eta=0.0)
        assert float(std) == 0.0
        out = cps_step(x, v, sigma, sigma_next, 0.0, rand(2, 4, 8, 8, seed=5, dtype=dtype))
        torch.testing.assert_close(out, euler_step(x, v, sigma, sigma_next))
        torch.testing.assert_close(out, x + (sigma_next - sigma) * v)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
def test_final_step_returns_x0_hat_exactly_with_zero_log_prob(eta):
    x, v = rand(2, 4, 8, 8, dtype=torch.float32), rand(2, 4, 8, 8, seed=1, dtype=torch.float32)
    out = cps_step(x, v, 0.5, 0.0, eta, rand(2, 4, 8, 8, seed=2, dtype=torch.float32))
    assert torch.equal(out, x0_from_velocity(x, v, 0.5))
    mean, std = cps_mean_std(x, v, 0.5, 0.0, eta)
    assert float(std) == 0.0
    assert torch.equal(gaussian_log_prob(out, mean, std), torch.zeros(2, dtype=torch.float64))


def test_coefficient_preservation_monte_carlo():
    """Oracle velocity: x' - (1 - s') x0 has mean 0 and variance s'^2 for eta = 0.9."""
    n, sigma, sigma_next = 400_000, 0.75, 0.5
    x0 = rand(1, n, seed=10) * 0.7 + 0.3
    eps, z = rand(1, n, seed=11), rand(1, n, seed=12)
    x = noisy(x0, eps, sigma)
    out = cps_step(x, velocity_target(x0, eps), sigma, sigma_next, ETA, z)
    residual = out - (1 - sigma_next) * x0
    assert abs(float(residual.mean())) < 4 * sigma_next / math.sqrt(n)
    assert float(residual.var()) == pytest.approx(sigma_next**2, rel=0.01)
    _, std = cps_mean_std(x, velocity_target(x0, eps), sigma, sigma_next, ETA)
    assert float(std) == pytest.approx(sigma_next * math.sin(ETA * math.pi / 2), abs=1e-15)
    assert eta_angle(ETA) == pytest.approx((0.15643, 0.98769), abs=1e-5)


def test_same_external_noise_gives_identical_outputs():
    x, v, z = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2)
    assert torch.equal(cps_step(x, v, 0.8, 0.4, ETA, z), cps_step(x, v, 0.8, 0.4, ETA, z.clone()))
    assert not torch.equal(cps_step(x, v, 0.8, 0.4, ETA, z), cps_step(x, v, 0.8, 0.4, ETA, rand(2, 4, 8, 8, seed=3)))


def test_per_sample_sigmas_broadcast():
    x, v, z = rand(3, 2, 4, 4), rand(3, 2, 4, 4, seed=1), rand(3, 2, 4, 4, seed=2)
    sigma, sigma_next = (
        torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64),
        torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64),
    )
    batched = cps_step(x, v, sigma, sigma_next, ETA, z)
    for i in range(3):
        torch.testing.assert_close(
            batched[i : i + 1],
            cps_step(x[i : i + 1], v[i : i + 1], float(sigma[i]), float(sigma_next[i]), ETA, z[i : i + 1]),
        )


# ---------------------------------------------------------------- 9. log-probs


def test_exact_log_prob_is_the_gaussian_density():
    mean, x_next = rand(3, 4, 5, 5), rand(3, 4, 5, 5, seed=1)
    std = torch.tensor([0.3, 0.7, 1.2], dtype=torch.float64)
    ref = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x_next).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), ref)
    torch.testing.assert_close(
        gaussian_log_prob(x_next, mean, 0.5), torch.distributions.Normal(mean, 0.5).log_prob(x_next).flatten(1).sum(1)
    )


def test_exact_log_prob_keeps_float64_precision_for_bf16_inputs():
    mean = rand(1, 16, 64, 64, dtype=torch.float32).to(torch.bfloat16)
    x_next = (mean.double() + 0.1 * rand(1, 16, 64, 64, seed=1)).to(torch.bfloat16)
    logp = gaussian_log_prob(x_next, mean, 0.1)
    ref = torch.distributions.Normal(mean.double(), 0.1).log_prob(x_next.double()).flatten(1).sum(1)
    # |log p| ~ 6e4 here: a difference or a sum taken in bf16 or float32 is off by far more than 1e-6
    assert logp.dtype == torch.float64 and float(ref.abs()) > 1e4
    torch.testing.assert_close(logp, ref, atol=1e-6, rtol=0)


def test_simplified_log_prob_formula():
    mean, x_next = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    torch.testing.assert_close(simplified_log_prob(x_next, mean), -((x_next - mean) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("kind", ["exact", "simplified"])
def test_log_prob_ratio_is_one_and_gradient_zero_at_the_mean(kind):
    x_next = rand(2, 3, 4, 4)
    mean = x_next.clone().requires_grad_(True)
    logp = gaussian_log_prob(x_next, mean, 0.4) if kind == "exact" else simplified_log_prob(x_next, mean)
    assert torch.equal(torch.exp(logp - logp.detach()), torch.ones(2, dtype=logp.dtype))
    (grad,) = torch.autograd.grad(logp.sum(), mean)
    assert torch.count_nonzero(grad) == 0


# ---------------------------------------------------------------- 10. PPO clipping


@pytest.mark.parametrize(
    ("advantage", "log_ratio", "zero_grad"),
    [
        (1.0, 0.5, True),  # A > 0, r > 1 + eps: clipped
        (-1.0, -0.5, True),  # A < 0, r < 1 - eps: clipped
        (1.0, -0.5, False),  # A > 0, r < 1 - eps: unclipped side
        (-1.0, 0.5, False),  # A < 0, r > 1 + eps: unclipped side
        (1.0, 0.0, False),  # inside the trust region
    ],
)
def test_ppo_clipping_gradient(advantage, log_ratio, zero_grad):
    logp_old = torch.tensor([0.3], dtype=torch.float64)
    logp = (logp_old + log_ratio).requires_grad_(True)
    loss = ppo_clipped_loss(logp, logp_old, torch.tensor([advantage], dtype=torch.float64), 0.2, 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert (float(grad) == 0.0) is zero_grad
    if not zero_grad:
        assert float(grad) == pytest.approx(-advantage * math.exp(log_ratio))


# ---------------------------------------------------------------- 16. shared-noise projection difference


@pytest.mark.parametrize(("t", "s"), [(0.9, 0.5), (0.6, 0.2), (0.7, 0.0)])
def test_shared_noise_projection_difference(t, s):
    x, v_fake, v_real = rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1), rand(2, 4, 8, 8, seed=2)
    cos, _ = eta_angle(ETA)
    for seed in (3, 4):  # no noise is left in the difference
        z = rand(2, 4, 8, 8, seed=seed)
        diff = cps_step(x, v_fake, t, s, ETA, z) - cps_step(x, v_real, t, s, ETA, z)
        torch.testing.assert_close(diff, (s * cos * (1 - t) - (1 - s) * t) * (v_fake - v_real))
    if s == 0.0:
        torch.testing.assert_close(diff, x0_from_velocity(x, v_fake, t) - x0_from_velocity(x, v_real, t))
