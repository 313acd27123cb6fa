"""How stage 2 wires its losses: the PPO term, the final step's DM and BP terms, the fake-score update
and the EMA cadence, each against an independent computation from the spec (§5.3-5.6 of
../shared/design/rtdmd_method.md) written here without the trainer's helpers. The models, the
rollouts and the addressed random draws are the trainer's inputs; every formula is recomputed."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd import distributed
from rtdmd.config import load
from rtdmd.seeding import randint, randn_rows, seed_for, uniform
from rtdmd.testing import assert_same_gradients, param_grads
from rtdmd.train import rl_step
from rtdmd.train.rl_config import RLConfig, trained_steps

GUIDANCE = 3.0
EPOCH = 1


def build(tmp_path, *overrides: str) -> rl_step.Session:
    args = [f"run_dir={tmp_path / 'run'}", "device=cpu", f"teacher_guidance=[{GUIDANCE}, {GUIDANCE}]", *overrides]
    cfg = load(RLConfig, "tiny", args, group="rl")
    sess = rl_step.build_session(cfg, distributed.init("cpu"), tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at the start: give both LoRAs weights, so the roles differ
        for params in (sess.gen_params, sess.fake_params):
            for p in params.values():
                p.add_(0.05 * torch.randn_like(p))
    return sess


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return build(tmp_path_factory.mktemp("wiring2"))


@pytest.fixture(scope="module")
def rollouts(session):
    trained = trained_steps(session.cfg, EPOCH)
    batches = [rl_step.rollout_batch(session, EPOCH, i, trained) for i in range(session.cfg.iterations_per_epoch)]
    advantages, _ = rl_step.epoch_advantages(session, batches)
    return trained, batches, advantages


def rows(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, *[1] * (like.ndim - 1)).to(like.dtype)


def test_ppo_term_value_and_gradient(session, rollouts):
    """§5.3/5.5: ``pi = N(mu, rho^2 I)`` with ``mu = (1 - s') x0 + s' cos(theta) eps``, ``rho = s'
    sin(theta)``, the exact log-density of the STORED next state, ``r = exp(log pi - log pi_old)``,
    ``L = mean_kept max(-A r, -A clip(r, 1 - e, 1 + e))`` with ``A`` clamped to [-5, 5], scaled by
    ``2 rho^2 / N`` (the official per-element gradient scale)."""
    cfg, models = session.cfg, session.models
    trained, batches, advantages = rollouts
    batch, j = batches[0], trained[0]
    adv = advantages[0] * 4  # some beyond the clip of 5
    assert adv.abs().max() > cfg.grpo.advantage_clip
    keep = adv != 0
    sigma, sigma_next = float(models.sigmas[j]), float(models.sigmas[j + 1])
    with torch.no_grad():  # move the policy away from theta_old: ratios leave 1, some clip
        moved = {k: p.detach().clone() for k, p in session.gen_params.items()}
        for p in session.gen_params.values():
            p.add_(2e-3 * torch.randn_like(p))
    try:
        x = batch.states[:, j]
        v = models.backbone.velocity(models.generator_run, x, sigma, batch.cond, 1.0)
        loss, _ = rl_step.ppo_term(session, batch, keep, adv, j, x, v)
        ours = param_grads(loss, session.gen_params)

        v = models.backbone.velocity(models.generator_run, x, sigma, batch.cond, 1.0).double()
        theta = cfg.sampler.eta * math.pi / 2
        x0, eps = x.double() - sigma * v, x.double() + (1 - sigma) * v
        mean = (1 - sigma_next) * x0 + sigma_next * math.cos(theta) * eps
        rho = sigma_next * math.sin(theta)
        x_next = batch.states[:, j + 1].double()
        n = x_next[0].numel()
        log_prob = (
            -((x_next - mean) ** 2).flatten(1).sum(1) / (2 * rho**2) - n * math.log(rho) - n / 2 * math.log(2 * math.pi)
        )
        ratio = torch.exp(log_prob - batch.log_probs[:, j].double())
        a = adv.double().clamp(-5.0, 5.0)
        e = cfg.grpo.clip_range
        per = torch.maximum(-a * ratio, -a * ratio.clamp(1 - e, 1 + e)) * (2 * rho**2 / n)
        expected = (per * keep).sum() / keep.sum()
        assert ((ratio - 1).abs() > e).any() and ((ratio - 1).abs() < e).any(), "want clipped and unclipped rows"
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
        assert_same_gradients(ours, param_grads(expected, session.gen_params))
    finally:
        with torch.no_grad():
            for k, p in session.gen_params.items():
                p.copy_(moved[k])


def test_final_step_dm_and_bp_terms(session, rollouts):
    """§5.5.1: renoise the clean prediction to ``t`` (s = 0), teacher WITH CFG ``w`` and fake without,
    ``g = (x0_f - x0_r) / mean|x0 - x0_r|``, ``dm = 0.5 mean((x0 - sg(x0 - g))^2)`` times the DM weight;
    §5.5.2: ``scale * mean relu(margin - sum_k w_k r_k(decode(x0)))``, the reward ASCENDED."""
    cfg, models = session.cfg, session.models
    _, batches, advantages = rollouts
    batch, last = batches[1], cfg.sampler.num_steps - 1
    keep = advantages[1] != 0
    sigma = float(models.sigmas[last])
    x = batch.states[:, last]

    def clean() -> torch.Tensor:
        v = models.backbone.velocity(models.generator_run, x, sigma, batch.cond, 1.0)
        return x.float() - sigma * v.float()

    loss, logs = rl_step.final_step_loss(session, EPOCH, batch, keep, clean(), GUIDANCE)
    ours = param_grads(loss, session.gen_params)

    x0 = clean()
    spec = cfg.renoise
    lo = spec.margin
    t = torch.tensor([lo + uniform(seed_for(cfg.seed, "rl-dm", EPOCH, i, "t")) * (1 - lo) for i in batch.samples])
    t = t.float().clamp(*spec.clamp)
    eps = randn_rows([seed_for(cfg.seed, "rl-dm", EPOCH, i, "renoise") for i in batch.samples], models.latent_shape)
    tt = rows(t, x0)
    with torch.no_grad():
        x_t = (1 - tt) * x0 + tt * eps
        x_real = x_t - tt * models.backbone.velocity(models.teacher, x_t, t, batch.cond, GUIDANCE).float()
        x_fake = x_t - tt * models.backbone.velocity(models.fake_run, x_t, t, batch.cond, 1.0).float()
    x0d = x0.double()
    g = (x_fake.double() - x_real.double()) / (x0d - x_real.double()).abs().mean(dim=(1, 2, 3), keepdim=True)
    kept = rows(keep, x0d)
    dm = (0.5 * ((x0d - (x0d - g).detach()) ** 2) * kept).mean(dim=(1, 2, 3)).sum() / keep.sum()
    images = models.backbone.decode(x0).float().clamp(0, 1)
    total = sum(term.weight * session.rewards[term.name](images, [], []).float() for term in cfg.rewards)
    bp = cfg.bp.scale * (torch.relu(cfg.bp.margin - total) * keep).sum() / keep.sum()
    assert logs["loss/dm"] == pytest.approx(float(dm.detach()), rel=1e-5)
    assert logs["loss/bp"] == pytest.approx(float(bp.detach()), rel=1e-5)
    assert_same_gradients(ours, param_grads(cfg.dm.weight * dm + bp, session.gen_params))


def test_fake_update_trains_on_the_final_samples_with_consistency(session, rollouts, monkeypatch):
    """§5.6: ONE step on the epoch's final samples ``x_4`` (s = 0): ``min(1, 10 t^2) (v - (eps - x0))^2``,
    the fake without CFG, plus gamma times the consistency estimator, chunks weighted by their share."""
    cfg, models = session.cfg, session.models
    obj = cfg.fake_objective
    _, batches, _ = rollouts
    captured = {}

    def capture(params, optimizer, clip):
        captured.update({k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(rl_step, "clip_and_step", capture)
    logs = rl_step.fake_update(session, EPOCH, batches)

    total_rows = sum(len(b.samples) for b in batches)
    expected = 0.0
    bb = models.backbone
    seed_of = lambda i, *what: seed_for(cfg.seed, "rl-fake", EPOCH, i, *what)  # noqa: E731
    low_noise = False
    for batch in batches:
        x0 = batch.states[:, -1].float()
        lo = cfg.renoise.margin
        t = torch.tensor([lo + uniform(seed_of(i, "t")) * (1 - lo) for i in batch.samples]).float()
        t = t.clamp(*cfg.renoise.clamp)
        tt = rows(t, x0)
        eps = randn_rows([seed_of(i, "renoise") for i in batch.samples], models.latent_shape)
        x_t = (1 - tt) * x0 + tt * eps
        v = bb.velocity(models.fake_run, x_t, t, batch.cond, 1.0)
        weight = (obj.weight_clamp * tt**2).clamp(max=1.0)
        low_noise = low_noise or float(weight.min()) < 0.6
        ambient = (weight * (v - (eps - x0)) ** 2).mean()
        rollback = torch.tensor(
            [randint(seed_of(i, "rollback"), 1, obj.consistency_max_rollback) for i in batch.samples]
        )
        t_prev = rows((t - rollback / 1000).clamp(min=0), x0)
        theta = cfg.sampler.eta * math.pi / 2
        anchor = x_t - tt * v
        h = []
        for k in (1, 2):
            z = randn_rows([seed_of(i, "consistency", k) for i in batch.samples], models.latent_shape)
            vd = v.detach()
            moved = (1 - t_prev) * (x_t - tt * vd) + t_prev * math.cos(theta) * (x_t + (1 - tt) * vd)
            moved = moved + t_prev * math.sin(theta) * z
            h.append(moved - t_prev * bb.velocity(models.fake_run, moved, t_prev.flatten(), batch.cond, 1.0))
        consistency = ((h[0] - anchor) * (h[1] - anchor)).mean()
        expected = expected + (ambient + obj.consistency_weight * consistency) * len(batch.samples) / total_rows
    assert low_noise, "no row where the ambient weighting departs from 1: the test would not see it dropped"
    assert logs["loss/fake"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert_same_gradients(captured, param_grads(expected, session.fake_params))


def test_stage_two_ema_cadence_and_decay(tmp_path):
    """§5.5: after optimiser step ``n`` (``n`` completed), when ``(n + 1) % every == 0``: the EMA takes
    ``iterations_per_epoch`` updates of decay ``min((1 + n) / (10 + n), d)`` against the same weights."""
    sess = build(tmp_path, "ema.every=3", "ema.decay=0.9")
    cfg = sess.cfg
    for done in range(1, 10):
        with torch.no_grad():
            for p in sess.gen_params.values():
                p.add_(0.01 * torch.randn_like(p))
        before = {k: v.clone() for k, v in sess.ema.shadow.items()}
        rl_step.ema_step(sess, done)
        decay = min((1 + done) / (10 + done), 0.9) ** cfg.iterations_per_epoch
        for k, p in sess.gen_params.items():
            expected = decay * before[k] + (1 - decay) * p.detach().float() if (done + 1) % 3 == 0 else before[k]
            torch.testing.assert_close(sess.ema.shadow[k], expected, rtol=1e-6, atol=1e-9)


def test_kept_row_means_do_not_depend_on_the_world_size(session, rollouts, monkeypatch):
    """Zero advantages falling unevenly over two ranks (3 of 4 rows kept on one, 1 on the other): each
    rank's PPO, DM and BP losses over its half, gradients averaged as DDP/FSDP do, equal the one-process
    losses over the whole sub-batch. Each rank divides by the kept rows of the global sub-batch over the
    ranks (the all-reduce stood in for by the two halves' counts), not by its own count."""
    cfg, models = session.cfg, session.models
    trained, batches, advantages = rollouts
    batch, j, last = batches[0], trained[0], cfg.sampler.num_steps - 1
    adv = advantages[0].clone()
    adv[[0, 4, 5, 6]] = 0.0  # rank 0 keeps 3 of its 4 rows, rank 1 keeps 1
    assert adv[1:4].ne(0).all() and adv[7] != 0
    keep = adv != 0

    def half(rows: list[int]) -> rl_step.Batch:
        pick = torch.tensor(rows)
        return rl_step.Batch(
            [batch.samples[i] for i in rows],
            [batch.prompt_ids[i] for i in rows],
            batch.cond.select(rows),
            batch.states[pick],
            batch.log_probs[pick],
            {k: v[pick] for k, v in batch.rewards.items()},
        )

    def losses(b: rl_step.Batch, a: torch.Tensor) -> tuple[dict, dict[str, float]]:
        x = b.states[:, j]
        v = models.backbone.velocity(models.generator_run, x, float(models.sigmas[j]), b.cond, 1.0)
        ppo, logs = rl_step.ppo_term(session, b, a != 0, a, j, x, v)
        x = b.states[:, last]
        v = models.backbone.velocity(models.generator_run, x, float(models.sigmas[last]), b.cond, 1.0)
        x0 = x.float() - float(models.sigmas[last]) * v.float()
        final, final_logs = rl_step.final_step_loss(session, EPOCH, b, a != 0, x0, GUIDANCE)
        return param_grads(ppo + final, session.gen_params), logs | final_logs

    one, one_logs = losses(batch, adv)
    global_share = torch.tensor(float(keep.sum()) / 2, dtype=torch.float64)
    monkeypatch.setattr(rl_step, "mean_across", lambda value: global_share)
    ranks = [losses(half(rows), adv[rows]) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])]
    # each term on its own (BP and DM are too small to show in the summed gradient); float32 decoding of
    # 4 rows against 8 moves BP by ~3e-8, the per-rank count by ~4e-4
    for key in ("loss/ppo", "loss/dm", "loss/bp"):
        assert one_logs[key] != 0
        assert (ranks[0][1][key] + ranks[1][1][key]) / 2 == pytest.approx(one_logs[key], rel=1e-6), key
    assert_same_gradients({k: (ranks[0][0][k] + ranks[1][0][k]) / 2 for k in one}, one)
