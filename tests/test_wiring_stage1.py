"""How stage 1 wires its losses: each term's value and gradient against an independent computation
from the spec (../shared/design/rtdmd_method.md §3.2, §4.2), written here without the trainer's
helpers. The models, the prompts and the addressed random draws are the trainer's inputs; every
formula that combines them is recomputed."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd import distributed
from rtdmd.config import load
from rtdmd.seeding import randint, randn_rows, seed_for
from rtdmd.testing import assert_same_gradients, param_grads
from rtdmd.train.distill import batch_prompts, build_session, generator_loss, train_step
from rtdmd.train.distill_config import DistillConfig
from rtdmd.train.fake_score import fake_loss
from rtdmd.train.subinterval import sample_subinterval

GUIDANCE = 3.0  # the teacher's CFG scale here: anything but 1 tells "with CFG" from "without"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiring1")
    overrides = [f"run_dir={root / 'run'}", "device=cpu", f"teacher_guidance=[{GUIDANCE}, {GUIDANCE}]"]
    cfg = load(DistillConfig, "tiny", overrides, group="distill")
    sess = build_session(cfg, distributed.init("cpu"), root)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: give both LoRAs weights, so the students differ from the teacher
        for params in (sess.gen_params, sess.fake_params):
            for p in params.values():
                p.add_(0.05 * torch.randn_like(p))
    return sess


def inputs(sess, step: int):
    samples = list(range(sess.cfg.batch_size))
    batch = batch_prompts(sess, step)
    cond = sess.models.backbone.encode([batch[i] for i in samples], guidance=GUIDANCE)
    return samples, cond


def per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *[1] * (like.ndim - 1)) if value.ndim else value


def cps(x, v, t, s, eta, z):
    """§3.2: ``(1 - s) x0 + s cos(theta) eps + s sin(theta) z`` with ``x0 = x - t v``, ``eps = x + (1 - t) v``."""
    t, s = per_sample(t, x), per_sample(s, x)
    theta = eta * math.pi / 2
    return (1 - s) * (x - t * v) + s * math.cos(theta) * (x + (1 - t) * v) + s * math.sin(theta) * z


@pytest.mark.parametrize("step", [1, 3])
def test_sub_interval_renoises_the_boundary_sample_from_its_own_level(session, step):
    """§4.2.1: ``s = sigma[K]`` and ``x_t = a x_s + sigma_ts eps`` with ``a = (1 - t)/(1 - s)``,
    ``sigma_ts^2 = t^2 - a^2 s^2``."""
    samples, cond = inputs(session, step)
    cfg, models = session.cfg, session.models
    sub = sample_subinterval(cfg, models, "gen", step, samples, cond, grad=False)
    assert sub.s == pytest.approx(float(models.sigmas[sub.stop]))
    t, s = per_sample(sub.t, sub.x_s), sub.s
    a = (1 - t) / (1 - s)
    sigma_ts = (t**2 - a**2 * s**2).clamp(min=1e-12).sqrt()
    torch.testing.assert_close(sub.x_t, a * sub.x_s + sigma_ts * sub.eps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [1, 3])
def test_generator_loss_value_and_gradient(session, step):
    """§4.2.2: teacher with CFG w and fake without, both projected back to s with ONE shared noise,
    ``g = (xs_f - xs_r) / mean|x_s - xs_r|``, ``L = 0.5 mean((x_s - sg(x_s - g))^2)``."""
    cfg, models = session.cfg, session.models
    samples, cond = inputs(session, step)
    loss, _ = generator_loss(cfg, models, step, samples, cond)
    ours = param_grads(loss, session.gen_params)

    sub = sample_subinterval(cfg, models, "gen", step, samples, cond, grad=True)
    bb = models.backbone
    with torch.no_grad():
        v_uncond = bb.velocity(models.teacher, sub.x_t, sub.t, cond, 1.0)
        v_real = bb.velocity(models.teacher, sub.x_t, sub.t, cond, GUIDANCE)
        v_fake = bb.velocity(models.fake_run, sub.x_t, sub.t, cond, 1.0)
        z = randn_rows([seed_for(cfg.seed, "gen", step, i, "project") for i in samples], models.latent_shape)
        x_real = cps(sub.x_t, v_real, sub.t, sub.s, cfg.sampler.eta, z)
        x_fake = cps(sub.x_t, v_fake, sub.t, sub.s, cfg.sampler.eta, z)
    assert not torch.allclose(v_real, v_uncond), "CFG must change the teacher here"
    x_s = sub.x_s.double()
    norm = (x_s - x_real.double()).abs().mean(dim=(1, 2, 3), keepdim=True)
    g = (x_fake.double() - x_real.double()) / norm
    expected = 0.5 * ((x_s - (x_s - g).detach()) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert_same_gradients(ours, param_grads(expected, session.gen_params))


def low_noise_steps(sess, count: int) -> list[int]:
    """Steps whose fake-loss draws put some sample below ``sigma_ts^2 = 1 / weight_clamp``, where the
    ambient weighting departs from 1 (a test on other steps could not see it dropped)."""
    found = []
    for step in range(200):
        samples, cond = inputs(sess, step)
        with torch.no_grad():
            sub = sample_subinterval(sess.cfg, sess.models, "fake", step, samples, cond, grad=False)
        a = (1 - sub.t) / (1 - sub.s)
        if float((sub.t**2 - a**2 * sub.s**2).min()) < 0.5 / sess.cfg.ac.weight_clamp:
            found.append(step)
        if len(found) == count:
            return found
    raise AssertionError("no step with a low-noise sample in 200")


@pytest.mark.parametrize("which", [0, 1])
def test_fake_loss_value_and_gradient(session, which):
    """§4.2.3-4.2.4: ``min(1, 10 sigma_ts^2) (v_phi - v*)^2`` with the ambient target, the fake
    without CFG, plus gamma times the two-sample consistency estimator: two stop-gradient CPS moves
    ``t -> t'`` with the fake's detached velocity, gradient through ``h_a``, ``h'_1``, ``h'_2``."""
    cfg, models = session.cfg, session.models
    ac = cfg.ac
    step = low_noise_steps(session, 2)[which]
    samples, cond = inputs(session, step)
    loss, _ = fake_loss(cfg, models, step, samples, cond)
    ours = param_grads(loss, session.fake_params)

    bb = models.backbone
    with torch.no_grad():
        sub = sample_subinterval(cfg, models, "fake", step, samples, cond, grad=False)
    x_s, x_t, eps, s = sub.x_s.float(), sub.x_t, sub.eps, sub.s
    t = per_sample(sub.t, x_t)
    v = bb.velocity(models.fake_run, x_t, sub.t, cond, 1.0)
    a = (1 - t) / (1 - s)
    sigma_ts = (t**2 - a**2 * s**2).clamp(min=1e-12).sqrt()
    target = -x_s / (1 - s) + (t + (1 - t) * s**2 / (1 - s) ** 2) / sigma_ts * eps
    weight = (ac.weight_clamp * sigma_ts**2).clamp(max=1.0)
    assert float(weight.min()) < 0.6
    ambient = (weight * (v - target) ** 2).mean()

    rollback = torch.tensor(
        [randint(seed_for(cfg.seed, "fake", step, i, "rollback"), 1, ac.consistency_max_rollback) for i in samples]
    )
    t_prev = per_sample((sub.t - rollback / 1000).clamp(min=0), x_t)
    anchor = x_t - t * v
    h = []
    for j in (1, 2):
        z = randn_rows([seed_for(cfg.seed, "fake", step, i, "consistency", j) for i in samples], models.latent_shape)
        with torch.no_grad():
            moved = cps(x_t, v.detach(), t, t_prev, cfg.sampler.eta, z)
        h.append(moved - t_prev * bb.velocity(models.fake_run, moved, t_prev.flatten(), cond, 1.0))
    consistency = ((h[0] - anchor) * (h[1] - anchor)).mean()
    expected = ambient + ac.consistency_weight * consistency
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)
    assert_same_gradients(ours, param_grads(expected, session.fake_params))


def test_the_ema_follows_every_step_and_the_generator_moves_every_few(tmp_path):
    """§4.1 / §4.3: ``e <- d e + (1 - d) p`` after EVERY train step (fake-only steps included); the
    generator changes only on steps ``(k + 1) % fake_updates_per_generator == 0``."""
    cfg = load(DistillConfig, "tiny", [f"run_dir={tmp_path / 'run'}", "device=cpu"], group="distill")
    sess = build_session(cfg, distributed.init("cpu"), tmp_path)
    d = cfg.ema_decay
    expected = {k: p.detach().float().clone() for k, p in sess.gen_params.items()}
    for step in range(4):
        before = {k: p.detach().clone() for k, p in sess.gen_params.items()}
        train_step(sess, step)
        moved = any(not torch.equal(before[k], p.detach()) for k, p in sess.gen_params.items())
        assert moved == ((step + 1) % cfg.fake_updates_per_generator == 0)
        for k, p in sess.gen_params.items():
            expected[k] = d * expected[k] + (1 - d) * p.detach().float()
            torch.testing.assert_close(sess.ema.shadow[k], expected[k], rtol=1e-6, atol=1e-9)


def test_plain_dmd_draws_its_levels_as_the_official_trainer(tmp_path):
    """The fake score's level: entry ``floor(1000 sigmoid(z))`` (at most 999) of the descending shifted
    1000-entry table, ``z ~ N(0, 1)``; the generator's: entry ``i ~ U{20..980}`` of the ascending one,
    ``sigma = shift((i + 1) / 1000)``, with SD3's shift 3 here."""
    from rtdmd.seeding import randn

    def shifted(u: float) -> float:
        return 3 * u / (1 + 2 * u)

    overrides = [f"run_dir={tmp_path / 'run'}", "device=cpu", "method=dmd", "ac=null", "dmd_levels.table_shift=3.0"]
    cfg = load(DistillConfig, "tiny", overrides, group="distill")
    sess = build_session(cfg, distributed.init("cpu"), tmp_path)
    samples, cond = inputs(sess, 0)
    for phase in ("fake", "gen"):
        with torch.no_grad():
            sub = sample_subinterval(cfg, sess.models, phase, 0, samples, cond, grad=False)
        expected = []
        for i in samples:
            seed = seed_for(cfg.seed, phase, 0, i, "t")
            if phase == "fake":
                u = 1 / (1 + math.exp(-float(randn(seed, ()))))
                expected.append(shifted(1 - min(math.floor(1000 * u), 999) / 1000))
            else:
                expected.append(shifted((randint(seed, 20, 980) + 1) / 1000))
        torch.testing.assert_close(sub.t.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
        assert sub.s == 0.0
    from rtdmd.train.distill_config import DMDLevelsSpec
    from rtdmd.train.subinterval import fake_table_level, generator_table_level

    spec = DMDLevelsSpec(table_shift=3.0)
    assert fake_table_level(0.0, spec) == pytest.approx(0.75)  # the median: sigmoid(0) = 1/2
    assert generator_table_level(20, spec) == pytest.approx(shifted(0.021))
    assert generator_table_level(980, spec) == pytest.approx(shifted(0.981))
    with pytest.raises(Exception, match="dmd_levels belongs to method 'dmd'"):
        load(DistillConfig, "tiny", [*overrides[:2], "dmd_levels.table_shift=3.0"], group="distill")
