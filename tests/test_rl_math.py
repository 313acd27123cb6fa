"""Stage 2's invariants on plain tensors and a per-step toy network (rtdmd_method.md §12, items 21-27)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from rtdmd.backbones.base import Cond
from rtdmd.distributed import World
from rtdmd.flow.cps import cps_mean_std, gaussian_log_prob
from rtdmd.losses.grpo import group_advantages, ppo_clipped_loss, reward_hinge
from rtdmd.rewards.simple import Brightness
from rtdmd.sampling import rollout
from rtdmd.train import rl_step
from rtdmd.train.rl_config import ARMS, GRPOSpec, RewardTerm, RLConfig, trained_steps
from rtdmd.train.rl_plan import k_repeat_batch, noise_seeds, select_steps
from rtdmd.train.roles import RoleSpec

SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
SHAPE = (3, 4, 4)


class StepNet(nn.Module):
    """``v = w_k x + b_k`` with separate parameters per pipeline step ``k`` (found from sigma), and
    ``c sigma x`` elsewhere (the renoised inputs of the final-step DMD term)."""

    def __init__(self) -> None:
        super().__init__()
        self.sigmas = SIGMAS[:-1]
        self.w = nn.Parameter(torch.linspace(0.5, 0.8, 4))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.3, 4))
        self.c = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        match = (sigma.view(-1, 1) - self.sigmas.view(1, -1)).abs() < 1e-6
        off = (~match.any(1)).view(-1, 1, 1, 1).to(x.dtype)
        out = off * self.c * sigma.view(-1, 1, 1, 1) * x
        for k in range(4):
            on = match[:, k].view(-1, 1, 1, 1).to(x.dtype)
            out = out + on * (self.w[k] * x + self.b[k])
        return out


class StepBackbone:
    """What stage 2 calls of a backbone, around :class:`StepNet`; images are ``sigmoid`` of latents."""

    device = torch.device("cpu")
    lora_targets = ()

    def __init__(self) -> None:
        self.transformer = StepNet()

    def encode(self, prompts, guidance=1.0):
        return Cond({"ids": torch.arange(len(prompts), dtype=torch.float32).view(-1, 1)})

    def velocity(self, net, x, sigma, cond, guidance=1.0):
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        return net(x.float(), sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma)

    def decode(self, latents):
        return torch.sigmoid(latents.float())

    def latent_shape(self, height, width):
        return SHAPE

    def schedule(self, num_steps, height, width, timesteps=None):
        return SIGMAS


def step_config(**changes) -> RLConfig:
    base = RLConfig(
        generator=RoleSpec(lora=None),
        fake=RoleSpec(lora=None),
        rewards=(RewardTerm("brightness"),),
        grpo=GRPOSpec(group_size=4),
        prompts=("a", "b", "c"),
        batch_size=8,
        iterations_per_epoch=2,
        precision="float32",
        distributed="none",
        device="cpu",
    )
    return dataclasses.replace(base, **changes)


def step_session(cfg: RLConfig) -> rl_step.Session:
    world = World(rank=0, size=1, device=torch.device("cpu"))
    return rl_step.build_session(cfg, world, Path("."), backbone=StepBackbone(), rewards={"brightness": Brightness()})


def captured_gradients(monkeypatch, sess, epoch: int = 0) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Run one generator update; return its accumulated gradients (before the step) and the count of steps."""

    grads, calls = {}, []

    def capture(params, optimizer, clip):
        calls.append(1)
        grads.update({k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(rl_step, "clip_and_step", capture)
    trained = trained_steps(sess.cfg, epoch)
    batches = [rl_step.rollout_batch(sess, epoch, i, trained) for i in range(sess.cfg.iterations_per_epoch)]
    advantages, _ = rl_step.epoch_advantages(sess, batches)
    rl_step.generator_update(sess, epoch, batches, advantages, trained)
    return grads, calls


# ---------------------------------------------------------------- 21: advantages


def test_advantages_are_group_centred_globally_scaled_and_weighted():
    gen = torch.Generator().manual_seed(0)
    groups = [g for g in range(6) for _ in range(4)]
    rewards = {"a": torch.rand(24, generator=gen), "b": 10 * torch.rand(24, generator=gen)}
    adv = group_advantages(rewards, {"a": 1.0, "b": 0.5}, groups)
    sums = torch.zeros(6, dtype=torch.float64).index_add_(0, torch.tensor(groups), adv)
    torch.testing.assert_close(sums, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(float((adv - adv.mean()).pow(2).mean().sqrt()) - 1) < 1e-3
    manual = 0
    for name, w in (("a", 1.0), ("b", 0.5)):  # the formula written out with explicit loops
        r = rewards[name].double()
        means = torch.stack([r[[i for i in range(24) if groups[i] == groups[j]]].mean() for j in range(24)])
        manual = manual + w * (r - means) / (r.std(unbiased=False) + 1e-4)
    manual = (manual - manual.mean()) / (manual.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv, manual)
    # a reward constant within every group gives no advantage
    flat = group_advantages({"a": torch.tensor(groups, dtype=torch.float64)}, {"a": 1.0}, groups)
    assert torch.equal(flat, torch.zeros(24, dtype=torch.float64))


# ---------------------------------------------------------------- 22: K-repeat sampler


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_k_repeat_sampler_gives_every_chosen_prompt_exactly_g_times(world_size):
    for iteration in range(5):
        batch = k_repeat_batch(0, 3, iteration, num_prompts=20, batch_size=24, group_size=6)
        counts = {p: batch.count(p) for p in set(batch)}
        assert len(counts) == 4 and set(counts.values()) == {6}
        shards = [
            [batch[i] for i in World(r, world_size, torch.device("cpu")).local_slice(24)] for r in range(world_size)
        ]
        assert all(len(s) == 24 // world_size for s in shards)
        assert sorted(p for s in shards for p in s) == sorted(batch)
    assert k_repeat_batch(0, 3, 1, 20, 24, 6) != k_repeat_batch(0, 4, 1, 20, 24, 6)
    with pytest.raises(ValueError, match="multiple of the group size"):
        k_repeat_batch(0, 0, 0, 20, 25, 6)


# ---------------------------------------------------------------- 23: step selection


def test_step_selection_is_m_distinct_in_range_the_same_on_every_rank_and_new_each_epoch():
    chosen = [select_steps(7, epoch, [0, 1, 2], 2) for epoch in range(30)]
    assert all(len(set(c)) == 2 and set(c) <= {0, 1, 2} for c in chosen)
    assert chosen == [select_steps(7, epoch, [0, 1, 2], 2) for epoch in range(30)]  # any rank, any time
    assert len(set(chosen)) == 3  # all three pairs occur
    cfg = step_config()
    assert trained_steps(cfg, 5) == select_steps(cfg.seed, 5, [0, 1, 2], 2)
    assert trained_steps(dataclasses.replace(cfg, arm="grpo-all-steps"), 5) == (0, 1, 2)
    assert trained_steps(dataclasses.replace(cfg, arm="bp-only"), 5) == ()


# ---------------------------------------------------------------- 24: shared noise


def test_shared_noise_inside_a_group_only_at_untrained_stochastic_steps():
    stochastic, trained = range(3), (0, 2)
    a = noise_seeds(0, 4, 10, "a cat", stochastic, trained, 4)
    b = noise_seeds(0, 4, 11, "a cat", stochastic, trained, 4)
    other_prompt = noise_seeds(0, 4, 12, "a dog", stochastic, trained, 4)
    next_epoch = noise_seeds(0, 5, 10, "a cat", stochastic, trained, 4)
    assert a[0] != b[0]  # initial latents are the image's own
    assert a[1] != b[1] and a[3] != b[3]  # trained steps 0 and 2: independent
    assert a[2] == b[2]  # untrained step 1: the group's noise
    assert a[2] != other_prompt[2] and a[2] != next_epoch[2]
    assert a[4] != b[4]  # the deterministic last step draws nothing; its seed is never shared


def test_rollouts_of_a_group_share_the_untrained_steps_noise():
    cfg = step_config()
    sess = step_session(cfg)
    trained = (0, 2)
    batch = rl_step.rollout_batch(sess, 0, 0, trained)
    ids = batch.prompt_ids
    same = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids)) if ids[i] == ids[j]]
    assert same
    states = batch.states
    net, sig = sess.generator, SIGMAS

    def noise(row: int, k: int) -> torch.Tensor:
        x = states[row : row + 1, k]
        mean, std = cps_mean_std(x, net(x, sig[k].expand(1)), float(sig[k]), float(sig[k + 1]), 0.9)
        return (states[row : row + 1, k + 1] - mean) / std

    for i, j in same:
        torch.testing.assert_close(noise(i, 1), noise(j, 1), atol=1e-5, rtol=0)
        assert not torch.allclose(noise(i, 0), noise(j, 0)) and not torch.allclose(noise(i, 2), noise(j, 2))
        assert not torch.allclose(states[i, 0], states[j, 0])


# ---------------------------------------------------------------- 25-27: gradient routing and accumulation


def test_subgrpo_gradient_reaches_only_the_trained_steps(monkeypatch):
    cfg = step_config(arm="no-dm", bp=dataclasses.replace(RLConfig().bp, margin=-100.0))  # BP hinge inactive
    sess = step_session(cfg)
    trained = trained_steps(cfg, 0)
    grads, _ = captured_gradients(monkeypatch, sess)
    for k in range(4):
        assert (grads["w"][k] != 0) == (k in trained), (k, trained, grads["w"])
        assert (grads["b"][k] != 0) == (k in trained)
    assert float(grads["c"]) == 0  # no DMD term: nothing renoised


def test_final_step_gets_only_dmd_and_bp_gradient_and_no_bp_above_the_margin(monkeypatch):
    cfg = step_config(
        arm="bp-only",
        dm=dataclasses.replace(RLConfig().dm, weight=0.0),
        bp=dataclasses.replace(RLConfig().bp, scale=1.0),
    )
    grads, _ = captured_gradients(monkeypatch, step_session(cfg))
    assert [bool(grads["w"][k] != 0) for k in range(4)] == [False, False, False, True]  # x_3 is a stored leaf
    assert float(grads["b"][3]) > 0  # brighter images need a larger x0 = x_3 - sigma_3 v: b_3 goes down
    above = dataclasses.replace(cfg, bp=dataclasses.replace(cfg.bp, margin=-1.0))  # every reward clears it
    grads, _ = captured_gradients(monkeypatch, step_session(above))
    assert all(float(g.abs().sum()) == 0 for g in grads.values())
    dmd = step_session(step_config(arm="dmd-only"))
    with torch.no_grad():
        dmd.models.fake_run.c.add_(0.3)  # a fake score that differs from the teacher
    grads, _ = captured_gradients(monkeypatch, dmd)
    assert [bool(grads["w"][k] != 0) for k in range(4)] == [False, False, False, True]


def test_accumulated_gradient_is_the_mean_loss_gradient_and_one_step_per_epoch(monkeypatch):
    cfg = step_config()
    sess = step_session(cfg)
    trained = trained_steps(cfg, 0)
    batches = [rl_step.rollout_batch(sess, 0, i, trained) for i in range(2)]
    advantages, _ = rl_step.epoch_advantages(sess, batches)
    losses = []  # the same terms, summed in one graph and divided by the count of (sub-batch, step) pairs
    for batch, adv in zip(batches, advantages, strict=True):
        for j in (*trained, 3):
            x = batch.states[:, j]
            v = sess.models.backbone.velocity(sess.models.generator_run, x, float(SIGMAS[j]), batch.cond)
            keep = adv != 0
            if j in trained:
                losses.append(rl_step.ppo_term(sess, batch, keep, adv, j, x, v)[0])
            else:
                x0 = x - SIGMAS[j] * v
                losses.append(rl_step.final_step_loss(sess, 0, batch, keep, x0, 4.5)[0])
    (torch.stack(losses).mean()).backward()
    expected = {k: p.grad.clone() for k, p in sess.gen_params.items()}
    sess.optimizers["generator"].zero_grad(set_to_none=True)
    grads, calls = captured_gradients(monkeypatch, sess)
    assert calls == [1]
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-6, atol=1e-12)


def test_ppo_ratio_is_exactly_one_at_the_old_policy_and_clipping_zeroes_the_gradient():
    cfg = step_config()
    sess = step_session(cfg)
    batch = rl_step.rollout_batch(sess, 0, 0, (0, 1))
    x = batch.states[:, 0]
    v = sess.models.backbone.velocity(sess.generator, x, 1.0, batch.cond)
    keep = torch.ones(8, dtype=torch.bool)
    _, logs = rl_step.ppo_term(sess, batch, keep, torch.ones(8, dtype=torch.float64), 0, x, v)
    assert logs["ppo/ratio_deviation_max"] == 0.0
    # the clipped branch is constant in the log-prob: zero gradient where it binds
    logp = torch.tensor([0.5, -0.5, 0.5, -0.5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    ppo_clipped_loss(logp, torch.zeros(4, dtype=torch.float64), adv, 0.2, 0.2).sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] == 0 and logp.grad[2] != 0 and logp.grad[3] != 0
    assert torch.equal(reward_hinge(torch.tensor([1.0, 4.0]), 3.0), torch.tensor([2.0, 0.0]))


def test_rollout_log_probs_are_the_exact_gaussian_densities():
    net, backbone = StepNet(), StepBackbone()
    seeds = [[1, 2, 3, 4, 5]]
    traj = rollout(backbone, net, backbone.encode(["a"]), SIGMAS, seeds, SHAPE, eta=0.9)
    for k in range(3):
        mean, std = cps_mean_std(
            traj.states[:, k], net(traj.states[:, k], SIGMAS[k].expand(1)), float(SIGMAS[k]), float(SIGMAS[k + 1]), 0.9
        )
        direct = torch.distributions.Normal(mean.double(), float(std)).log_prob(traj.states[:, k + 1].double()).sum()
        torch.testing.assert_close(traj.log_probs[0, k], direct)
        torch.testing.assert_close(gaussian_log_prob(traj.states[:, k + 1], mean, std)[0], direct)
    assert float(traj.log_probs[0, 3]) == 0.0


def test_arms_are_one_switch_each():
    assert set(ARMS) == {"rtdmd", "grpo-all-steps", "no-bp", "no-dm", "bp-only", "dmd-only"}
    base = ARMS["rtdmd"]
    for name, terms in ARMS.items():
        changed = [f.name for f in dataclasses.fields(terms) if getattr(terms, f.name) != getattr(base, f.name)]
        assert name == "rtdmd" or changed, name
    assert ARMS["dmd-only"] == dataclasses.replace(base, ppo=False, subgrpo=False, bp=False)


def test_per_element_scaled_exact_ppo_has_the_official_gradient(monkeypatch):
    """At the old policy (the ratio is exactly 1) the exact log-density scaled by ``2 rho^2 / N``
    gives the gradient of the official simplified form; unscaled it is ``N / (2 rho^2)`` larger."""
    results = {}
    for name, changes in {
        "exact": {},
        "simplified": {"log_prob": "simplified", "clip_range": 1e-5},
        "density": {"exact_scale": "density"},
    }.items():
        cfg = step_config(arm="no-dm", bp=dataclasses.replace(RLConfig().bp, margin=-100.0))
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, **changes))
        results[name], _ = captured_gradients(monkeypatch, step_session(cfg))
    for key in ("w", "b"):
        torch.testing.assert_close(results["exact"][key], results["simplified"][key], rtol=1e-5, atol=1e-12)
    trained = trained_steps(step_config(), 0)
    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    for k in trained:
        rho = float(SIGMAS[k + 1]) * 0.98768834
        factor = float(results["density"]["w"][k] / results["exact"]["w"][k])
        assert abs(factor - n / (2 * rho**2)) < 1e-3 * factor


def test_zero_advantages_leave_every_loss_but_keep_every_call_and_log(monkeypatch):
    """A sub-batch whose advantages are all exactly 0 contributes nothing, yet runs the same forwards
    and logs the same keys (every rank must take part in the same collectives)."""

    sess = step_session(step_config())
    with torch.no_grad():
        sess.models.fake_run.c.add_(0.3)  # a fake score that differs from the teacher: the DM term is not 0
    trained = trained_steps(sess.cfg, 0)
    batches = [rl_step.rollout_batch(sess, 0, i, trained) for i in range(2)]
    calls = []
    monkeypatch.setattr(rl_step, "clip_and_step", lambda params, optimizer, clip: calls.append(1) or 0.0)
    zero = [torch.zeros(len(b.samples), dtype=torch.float64) for b in batches]
    logs = rl_step.generator_update(sess, 0, batches, zero, trained)
    assert calls == [1] and all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in sess.gen_params.values())
    advantages, _ = rl_step.epoch_advantages(sess, batches)
    for p in sess.gen_params.values():
        p.grad = None
    assert set(rl_step.generator_update(sess, 0, batches, advantages, trained)) == set(logs)


def test_rows_with_zero_advantage_leave_every_term_and_its_mean(monkeypatch):
    """Each term of a sub-batch is a mean over its rows with a non-zero advantage. With each sub-batch's
    rows split into halves A and B: G(advantages on A only) + G(on B only) = 2 G(on both), for PPO, the
    DM term and reward BP together. A term that keeps the zeroed rows, or divides by every row, breaks it."""

    sess = step_session(step_config())
    with torch.no_grad():
        sess.models.fake_run.c.add_(0.3)
    trained = trained_steps(sess.cfg, 0)
    batches = [rl_step.rollout_batch(sess, 0, i, trained) for i in range(2)]
    advantages, _ = rl_step.epoch_advantages(sess, batches)
    assert all(bool((a != 0).all()) for a in advantages)
    grads = []
    monkeypatch.setattr(
        rl_step,
        "clip_and_step",
        lambda params, optimizer, clip: grads.append({k: p.grad.clone() for k, p in params.items()}) or 0.0,
    )

    def gradient(advs):
        for p in sess.gen_params.values():
            p.grad = None
        logs = rl_step.generator_update(sess, 0, batches, advs, trained)
        assert all(logs[k] != 0 for k in ("loss/ppo", "loss/dm", "loss/bp"))  # every term is active
        return grads[-1]

    halves = [torch.arange(len(a)) % 2 == 0 for a in advantages]
    only_a = gradient([a * h for a, h in zip(advantages, halves, strict=True)])
    only_b = gradient([a * ~h for a, h in zip(advantages, halves, strict=True)])
    both = gradient(advantages)
    for k in both:
        torch.testing.assert_close(only_a[k] + only_b[k], 2 * both[k], rtol=1e-6, atol=1e-10)


def test_stage_two_ema_follows_the_official_schedule():
    sess = step_session(step_config(ema=dataclasses.replace(RLConfig().ema, every=8)))
    start = {k: v.clone() for k, v in sess.ema.shadow.items()}
    with torch.no_grad():
        for p in sess.gen_params.values():
            p.add_(1.0)
    for done in range(1, 7):
        rl_step.ema_step(sess, done)
        assert all(torch.equal(sess.ema.shadow[k], start[k]) for k in start)  # (n + 1) % 8 != 0: untouched
    rl_step.ema_step(sess, 7)
    decay = min(8 / 17, 0.9) ** sess.cfg.iterations_per_epoch  # one update per sub-batch, n = 7
    for k, p in sess.gen_params.items():
        torch.testing.assert_close(sess.ema.shadow[k], decay * start[k] + (1 - decay) * p.detach())
