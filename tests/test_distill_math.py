"""Stage-1 maths: rtdmd_method.md §12 invariants 11-20 and 28-29."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from rtdmd.backbones.base import Cond
from rtdmd.backbones.tiny import TinyBackbone
from rtdmd.flow.cps import cps_step
from rtdmd.flow.path import noisy, renoise, renoise_coefficients, x0_from_velocity
from rtdmd.losses.ac_dmd import ambient_loss, ambient_target, consistency_loss
from rtdmd.losses.dmd import dmd_direction, dmd_loss
from rtdmd.sampling import rollout, seed_table
from rtdmd.train.distill_config import DistillConfig
from rtdmd.train.fake_score import consistency_term
from rtdmd.train.roles import EMA, LoraSpec, Models, attach_lora, ema_update_, merge_lora, warmup_decay
from rtdmd.train.subinterval import sample_subinterval

SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class StepNet(nn.Module):
    """A toy velocity ``v = w_k x + b_k`` with separate parameters per pipeline step ``k`` (found from
    sigma), and a smooth dependence on sigma elsewhere (for renoised inputs)."""

    def __init__(self, sigmas: torch.Tensor = SIGMAS) -> None:
        super().__init__()
        self.sigmas = sigmas[:-1]
        self.w = nn.Parameter(torch.linspace(0.5, 0.8, len(self.sigmas)))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.3, len(self.sigmas)))
        self.c = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        match = (sigma.view(-1, 1) - self.sigmas.view(1, -1)).abs() < 1e-6
        out = self.c * sigma.view(-1, *([1] * (x.ndim - 1))) * x
        for k in range(len(self.sigmas)):
            on = match[:, k].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            out = out + on * (self.w[k] * x + self.b[k])
        return out


class ToyBackbone:
    """Just what the samplers and the stage-1 losses call."""

    device = torch.device("cpu")

    def velocity(self, net, x, sigma, cond, guidance=1.0):
        sigma = (
            torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
            if not torch.is_tensor(sigma) or sigma.ndim == 0
            else sigma
        )
        return net(x.float(), sigma.float()).float()


def toy_cond(n: int) -> Cond:
    return Cond({"prompt_embeds": torch.zeros(n, 1)})


# ---------------------------------------------------------------- 11. renoise coefficients


def test_renoise_coefficients_and_marginal():
    for s, t in [(0.0, 0.4), (0.5, 0.75), (0.9, 0.95), (0.2, 0.98)]:
        a, sigma_ts = renoise_coefficients(s, t)
        assert a * (1 - s) == pytest.approx(1 - t, abs=1e-15)
        assert a**2 * s**2 + sigma_ts**2 == pytest.approx(t**2, abs=1e-15)
    n, s, t = 400_000, 0.5, 0.8
    x0 = rand(1, n, seed=1) * 0.5 + 0.2
    x_s = noisy(x0, rand(1, n, seed=2), s)
    x_t = renoise(x_s, s, t, rand(1, n, seed=3))
    residual = x_t - (1 - t) * x0
    assert abs(float(residual.mean())) < 4 * t / math.sqrt(n)
    assert float(residual.var()) == pytest.approx(t**2, rel=0.01)


# ---------------------------------------------------------------- 12. ambient target


def test_ambient_target_at_s_zero_is_the_flow_matching_target():
    x0, eps = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.equal(ambient_target(x0, eps, 0.0, t), eps - x0)


def test_ambient_target_implied_x0_is_the_double_tweedie_combination():
    s, t = 0.4, 0.85
    x_s, eps = rand(3, 8, seed=1), rand(3, 8, seed=2)
    x_t = renoise(x_s, s, t, eps)
    implied = x_t - t * ambient_target(x_s, eps, s, t)
    lam = lambda sig: sig / (1 - sig)  # noqa: E731
    y_s, y_t = x_s / (1 - s), x_t / (1 - t)
    torch.testing.assert_close(implied, (lam(t) ** 2 * y_s - lam(s) ** 2 * y_t) / (lam(t) ** 2 - lam(s) ** 2))


# ---------------------------------------------------------------- 13. ambient-DSM unbiasedness


@pytest.mark.parametrize(("s", "t"), [(0.0, 0.6), (0.3, 0.7), (0.6, 0.9)])
def test_ambient_dsm_regression_recovers_the_posterior_mean(s, t):
    """x0 ~ N(m, v0): least squares of (x_t - t v*) on x_t gives E[x0 | x_t] (slope and intercept)."""
    n, m, v0 = 2_000_000, 0.7, 0.5
    x0 = m + math.sqrt(v0) * rand(n, seed=4)
    x_s = noisy(x0, rand(n, seed=5), s)
    eps = rand(n, seed=6)
    x_t = renoise(x_s, s, t, eps)
    y = x_t - t * ambient_target(x_s, eps, s, t)
    design = torch.stack([x_t, torch.ones_like(x_t)], 1)
    slope, intercept = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    denom = (1 - t) ** 2 * v0 + t**2
    assert slope == pytest.approx((1 - t) * v0 / denom, abs=4e-3)
    assert intercept == pytest.approx(m * t**2 / denom, abs=4e-3)


# ---------------------------------------------------------------- 14. weighted loss form


def test_ambient_loss_weighting():
    v, target = rand(3, 2, 4, 4, seed=1), rand(3, 2, 4, 4, seed=2)
    s = 0.3
    t = torch.tensor([0.31, 0.5, 0.95], dtype=torch.float64)
    _, sigma_ts = renoise_coefficients(s, t)
    weight = torch.minimum(torch.ones_like(sigma_ts), 10 * sigma_ts**2).view(-1, 1, 1, 1)
    torch.testing.assert_close(ambient_loss(v, target, s, t), (weight * (v - target) ** 2).mean())
    torch.testing.assert_close(ambient_loss(v, target, s, t, move_scale_out=False), ((v - target) ** 2).mean())
    assert float(weight.min()) < 1 and float(weight.max()) == 1  # the near-singular sample is down-weighted


# ---------------------------------------------------------------- 15. DMD loss gradient


def test_dmd_loss_gradient_and_descent():
    x = rand(2, 3, 4, 4, seed=1).requires_grad_(True)
    x_real = rand(2, 3, 4, 4, seed=2)
    g = dmd_direction(x, x_real, x.detach())  # a perfect fake: x_fake = x
    (grad,) = torch.autograd.grad(dmd_loss(x, g), x)
    torch.testing.assert_close(grad, g.double() / x.numel())
    stepped = x.detach() - 0.1 * x.numel() * grad  # a small step along -g
    assert float((stepped - x_real).norm()) < float((x.detach() - x_real).norm())
    norm = (x.detach() - x_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(g, (x.detach() - x_real) / norm)
    assert torch.count_nonzero(dmd_direction(x_real, x_real, x_real)) == 0  # zero normaliser -> 0, not NaN


# ---------------------------------------------------------------- 16. shared noise (generator update)


def test_projections_share_one_noise_draw():
    """With one z for both projections, x_fake - x_real carries no noise (tested fully in test_flow)."""
    x_t, v_f, v_r = rand(2, 4, seed=1), rand(2, 4, seed=2), rand(2, 4, seed=3)
    diffs = [
        cps_step(x_t, v_f, 0.8, 0.5, 0.9, z) - cps_step(x_t, v_r, 0.8, 0.5, 0.9, z)
        for z in (rand(2, 4, seed=4), rand(2, 4, seed=5))
    ]
    torch.testing.assert_close(diffs[0], diffs[1])


# ---------------------------------------------------------------- 17-18. truncation and random stop


@pytest.mark.parametrize("stop", [1, 2, 3, 4])
def test_gradient_reaches_only_the_last_executed_step(stop):
    net = StepNet()
    seeds = seed_table(0, [("a", 0), ("b", 0)], 4)
    traj = rollout(
        ToyBackbone(), net, toy_cond(2), SIGMAS, seeds, (2, 4, 4), eta=0.9, record=False, stop=stop, grad_last=True
    )
    traj.final.pow(2).sum().backward()
    for k in range(4):
        assert (net.w.grad[k] != 0) == (k == stop - 1), (k, net.w.grad)
        assert (net.b.grad[k] != 0) == (k == stop - 1)


def tiny_models(backbone, net=None) -> tuple[DistillConfig, Models]:
    cfg = DistillConfig(prompts=("x",), batch_size=2, distributed="none", precision="float32")
    net = net or StepNet()
    return cfg, Models(backbone, net, net, net, SIGMAS, (2, 4, 4))


def test_random_stop_covers_1_to_4_and_stop_4_is_the_clean_prediction():
    cfg, models = tiny_models(ToyBackbone())
    seen = set()
    for step in range(40):
        sub = sample_subinterval(cfg, models, "gen", step, [0, 1], toy_cond(2), grad=False)
        seen.add(sub.stop)
        assert sub.s == float(SIGMAS[sub.stop])
        assert bool((sub.t >= min(sub.s + 0.01, 0.98) - 1e-6).all()) and bool((sub.t <= 0.98).all())
        if sub.stop == 4:
            assert sub.s == 0.0
    assert seen == {1, 2, 3, 4}


def test_stop_4_boundary_equals_x0_hat_and_dmd_uses_clean_predictions():
    cfg, models = tiny_models(ToyBackbone())
    step = next(
        s for s in range(100) if sample_subinterval(cfg, models, "gen", s, [0], toy_cond(1), grad=False).stop == 4
    )
    seeds = seed_table(cfg.seed, [(f"gen/{step}", 0)], 4)
    traj = rollout(ToyBackbone(), models.generator_run, toy_cond(1), SIGMAS, seeds, (2, 4, 4), eta=0.9, record=False)
    sub = sample_subinterval(cfg, models, "gen", step, [0], toy_cond(1), grad=False)
    torch.testing.assert_close(sub.x_s, x0_from_velocity(traj.last_input, traj.last_velocity, 0.5))
    dmd = dataclasses.replace(cfg, method="dmd", ac=None)
    for s in range(6):
        sub = sample_subinterval(dmd, models, "gen", s, [0], toy_cond(1), grad=False)
        assert sub.s == 0.0


# ---------------------------------------------------------------- 19-20. consistency regulariser


def test_two_sample_estimator_expectation():
    n, mu, h = 1_000_000, 0.7, 0.2
    h1, h2 = mu + rand(n, 1, seed=1), mu + rand(n, 1, seed=2)
    assert float(consistency_loss(h1, h2, torch.full_like(h1, h))) == pytest.approx((mu - h) ** 2, abs=5e-3)
    martingale = consistency_loss(h + rand(n, 1, seed=3), h + rand(n, 1, seed=4), torch.full_like(h1, h))
    assert abs(float(martingale)) < 5e-3
    same = mu + rand(4, 3, seed=5)  # deterministic transitions: both draws coincide -> the MSE
    torch.testing.assert_close(
        consistency_loss(same, same, torch.zeros_like(same)), (same**2).mean(), check_dtype=False
    )


def test_consistency_gradient_flows_through_denoisers_not_transitions():
    from rtdmd.seeding import seed_for

    cfg, models = tiny_models(ToyBackbone())
    net = models.fake_run
    sub = sample_subinterval(cfg, models, "fake", 3, [0, 1], toy_cond(2), grad=False)
    v = ToyBackbone().velocity(net, sub.x_t, sub.t, None)
    loss = consistency_term(
        models,
        sub.x_t,
        sub.t,
        v,
        toy_cond(2),
        0.9,
        200,
        [0, 1],
        lambda i, *what: seed_for(cfg.seed, "fake", 3, i, *what),
    )
    ours = torch.autograd.grad(loss, [net.c], retain_graph=True)[0]

    # the same estimator written out with constant transitions
    from rtdmd.seeding import randint, randn_rows

    rollback = torch.tensor([randint(seed_for(cfg.seed, "fake", 3, i, "rollback"), 1, 200) for i in (0, 1)]) / 1000
    t_prev = (sub.t - rollback).clamp(min=0)
    moves = [
        cps_step(
            sub.x_t,
            v.detach(),
            sub.t,
            t_prev,
            0.9,
            randn_rows([seed_for(cfg.seed, "fake", 3, i, "consistency", j) for i in (0, 1)], (2, 4, 4)),
        )
        for j in (1, 2)
    ]
    assert not moves[0].requires_grad
    anchor = x0_from_velocity(sub.x_t, v, sub.t)
    h = [x0_from_velocity(m, ToyBackbone().velocity(net, m, t_prev, None), t_prev) for m in moves]
    manual = torch.autograd.grad(consistency_loss(h[0], h[1], anchor), [net.c], retain_graph=True)[0]
    torch.testing.assert_close(ours, manual)

    # letting the gradient through the transitions changes it: the stop-gradient matters
    through = [
        cps_step(
            sub.x_t,
            v,
            sub.t,
            t_prev,
            0.9,
            randn_rows([seed_for(cfg.seed, "fake", 3, i, "consistency", j) for i in (0, 1)], (2, 4, 4)),
        )
        for j in (1, 2)
    ]
    h_through = [x0_from_velocity(m, ToyBackbone().velocity(net, m, t_prev, None), t_prev) for m in through]
    other = torch.autograd.grad(consistency_loss(h_through[0], h_through[1], anchor), [net.c])[0]
    assert not torch.allclose(ours, other)


# ---------------------------------------------------------------- 28. EMA


def test_ema_update_and_warmup():
    e, p = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    ema_update_(e, p, 0.9)
    torch.testing.assert_close(e, torch.tensor([1.2, 1.6]))
    assert [warmup_decay(n, 0.9) for n in (0, 1, 8, 100)] == pytest.approx([0.1, 2 / 11, 0.5, 0.9])
    param = nn.Parameter(torch.zeros(2))
    ema = EMA({"w": param}, decay=0.99)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update({"w": param})
    torch.testing.assert_close(ema.shadow["w"], torch.full((2,), 0.01))
    with ema.swapped_in({"w": param}):
        torch.testing.assert_close(param.detach(), torch.full((2,), 0.01))
    torch.testing.assert_close(param.detach(), torch.ones(2))


# ---------------------------------------------------------------- 29. LoRA merge, then a fresh LoRA


def test_merge_then_fresh_lora_leaves_outputs_unchanged():
    tiny = TinyBackbone.build()
    net = attach_lora(tiny.transformer, LoraSpec(rank=4, alpha=8.0), tiny.lora_targets, seed=1)
    with torch.no_grad():  # make the LoRA matter: B starts at zero
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randn(2, *tiny.latent_shape(32, 32))
    cond = tiny.encode(["a", "b"])
    with torch.no_grad():
        before = tiny.velocity(net, x, 0.7, cond)
        base = tiny.velocity(TinyBackbone.build().transformer, x, 0.7, cond)
        assert not torch.allclose(before, base, atol=1e-4)
        merge_lora(net)
        assert not any("lora_" in n for n, _ in net.named_parameters())
        merged = tiny.velocity(net, x, 0.7, cond)
        attach_lora(net, LoraSpec(rank=4, alpha=8.0), tiny.lora_targets, seed=2)
        fresh = tiny.velocity(net, x, 0.7, cond)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh, merged, rtol=0, atol=1e-6)
