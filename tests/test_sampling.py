"""Samplers: seeding invariance, eta = 0 equals Euler, trajectories, NFE counting."""

from __future__ import annotations

import pytest
import torch

from rtdmd.backbones.tiny import TinyBackbone
from rtdmd.flow.cps import cps_mean_std, gaussian_log_prob, simplified_log_prob
from rtdmd.flow.schedules import RTDMD_TIMESTEPS
from rtdmd.sampling import ForwardCounter, SamplerSpec, generate, rollout, seed_table
from rtdmd.seeding import INIT_STEP, randn, seed_for

STUDENT = SamplerSpec(num_steps=4, eta=0.9, guidance=1.0, timesteps=RTDMD_TIMESTEPS)
TEACHER = SamplerSpec(num_steps=6, eta=0.0, guidance=4.5)
PROMPTS = [
    f"prompt number {i}: a {c} shape" for i, c in enumerate(["red", "green", "blue", "cyan", "pink", "black", "white"])
]
KEYS = [(f"p{i}", i % 3) for i in range(7)]


@pytest.fixture(scope="module")
def tiny():
    return TinyBackbone.build()


def gen(tiny, prompts, keys, spec, **kw):
    return generate(tiny, tiny.transformer, prompts, keys, spec, run_seed=11, height=32, width=32, **kw)


@pytest.mark.parametrize("spec", [STUDENT, TEACHER], ids=["student-cps", "teacher-euler-cfg"])
def test_images_are_bit_identical_alone_in_a_batch_and_in_any_order(tiny, spec):
    batch = gen(tiny, PROMPTS, KEYS, spec)
    for i in range(7):
        alone = gen(tiny, PROMPTS[i : i + 1], KEYS[i : i + 1], spec)
        assert torch.equal(alone[0], batch[i]), i
    order = [3, 6, 0, 5, 1, 4, 2]
    shuffled = gen(tiny, [PROMPTS[i] for i in order], [KEYS[i] for i in order], spec)
    assert torch.equal(shuffled, batch[order])


def test_compute_batch_is_part_of_the_contract(tiny):
    """The invariance holds for a fixed compute_batch; another compute shape may round differently,
    but only in the last bits."""
    a = gen(tiny, PROMPTS, KEYS, STUDENT, compute_batch=4)
    b = gen(tiny, PROMPTS, KEYS, STUDENT, compute_batch=1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_coordinates_decide_the_noise(tiny):
    base = gen(tiny, PROMPTS[:1], [("p", 0)], STUDENT)
    assert not torch.equal(base, gen(tiny, PROMPTS[:1], [("p", 1)], STUDENT))  # another sample index
    assert not torch.equal(base, gen(tiny, PROMPTS[:1], [("q", 0)], STUDENT))  # another prompt id
    other_seed = generate(tiny, tiny.transformer, PROMPTS[:1], [("p", 0)], STUDENT, run_seed=12, height=32, width=32)
    assert not torch.equal(base, other_seed)
    assert torch.equal(base, gen(tiny, PROMPTS[:1], [("p", 0)], STUDENT))


def test_seed_table_addresses_every_draw_by_coordinates():
    table = seed_table(5, [("a", 0), ("b", 2)], num_steps=3)
    assert table[0] == [seed_for(5, "a", 0, step) for step in (INIT_STEP, 0, 1, 2)]
    assert table[1][0] == seed_for(5, "b", 2, INIT_STEP)
    assert len({s for row in table for s in row}) == 8


def test_rollout_records_states_means_and_log_probs(tiny):
    sigmas = tiny.schedule(4, 32, 32, RTDMD_TIMESTEPS)
    seeds = seed_table(0, [("a", 0), ("b", 0)], 4)
    shape = tiny.latent_shape(32, 32)
    cond = tiny.encode(["a", "b"])
    traj = rollout(tiny, tiny.transformer, cond, sigmas, seeds, shape, eta=0.9)
    assert traj.states.shape == (2, 5, *shape) and traj.means.shape == (2, 4, *shape)
    assert torch.equal(traj.states[:, 0], torch.stack([randn(row[0], shape) for row in seeds]))
    assert torch.equal(traj.states[:, -1], traj.final)
    for k in range(4):
        v = tiny.velocity(tiny.transformer, traj.states[:, k], float(sigmas[k]), cond)
        mean, std = cps_mean_std(traj.states[:, k], v, float(sigmas[k]), float(sigmas[k + 1]), 0.9)
        torch.testing.assert_close(traj.means[:, k], mean)
        assert float(traj.stds[k]) == pytest.approx(float(std))
        if k < 3:  # the injected noise is the seeded draw of step k
            noise = torch.stack([randn(row[k + 1], shape) for row in seeds])
            torch.testing.assert_close(traj.states[:, k + 1], mean + std * noise)
        torch.testing.assert_close(traj.log_probs[:, k], gaussian_log_prob(traj.states[:, k + 1], mean, std))
        torch.testing.assert_close(traj.log_probs_simplified[:, k], simplified_log_prob(traj.states[:, k + 1], mean))
    assert float(traj.stds[-1]) == 0.0 and torch.equal(traj.log_probs[:, -1], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(traj.states[:, -1], traj.means[:, -1])  # deterministic final step


def test_eta_zero_sampler_is_euler(tiny):
    sigmas = tiny.schedule(3, 32, 32)
    seeds = seed_table(0, [("a", 0)], 3)
    shape = tiny.latent_shape(32, 32)
    cond = tiny.encode(["a"])
    traj = rollout(tiny, tiny.transformer, cond, sigmas, seeds, shape, eta=0.0)
    x = randn(seeds[0][0], shape).unsqueeze(0)
    for k in range(3):
        v = tiny.velocity(tiny.transformer, x, float(sigmas[k]), cond)
        x = x + (float(sigmas[k + 1]) - float(sigmas[k])) * v
    torch.testing.assert_close(traj.final, x)
    assert torch.count_nonzero(traj.log_probs) == 0


def test_measured_nfe_counts_cfg_branches(tiny):
    for spec, nfe in ((STUDENT, 4), (TEACHER, 12)):
        counter = ForwardCounter(tiny.transformer)
        gen(tiny, PROMPTS[:4], KEYS[:4], spec)
        counter.close()
        assert counter.rows / 4 == nfe


def test_sampler_spec_validation(tiny):
    for bad, message in (
        (SamplerSpec(num_steps=0), "num_steps must be >= 1"),
        (SamplerSpec(eta=1.5), r"eta must lie in \[0, 1\]"),
        (SamplerSpec(num_steps=4, timesteps=(1.0, 0.5)), "timesteps has 2 entries for num_steps=4"),
        (SamplerSpec(guidance=-1.0), "guidance must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            bad.validate()
        with pytest.raises(ValueError, match=message):  # generate validates before it samples
            gen(tiny, PROMPTS[:1], KEYS[:1], bad)
    with pytest.raises(ValueError, match="keys"):
        gen(tiny, PROMPTS[:2], KEYS[:1], STUDENT)


def test_diffusers_scheduler_sampling_keeps_the_seed_contract(tiny):
    spec = SamplerSpec(
        num_steps=4,
        eta=0.0,
        guidance=1.0,
        scheduler="DPMSolverMultistepScheduler",
        scheduler_config={
            "algorithm_type": "dpmsolver++",
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": 6.0,
            "final_sigmas_type": "zero",
        },
    )
    batch = gen(tiny, PROMPTS, KEYS, spec)
    assert all(torch.equal(gen(tiny, PROMPTS[i : i + 1], KEYS[i : i + 1], spec)[0], batch[i]) for i in (0, 6))
    counter = ForwardCounter(tiny.transformer)
    gen(tiny, PROMPTS[:4], KEYS[:4], spec)
    counter.close()
    assert counter.rows / 4 == 4
    with pytest.raises(ValueError, match="set eta=0"):
        SamplerSpec(eta=0.9, scheduler="DPMSolverMultistepScheduler").validate()
    with pytest.raises(ValueError, match="stochastic"):
        SamplerSpec(
            eta=0.0,
            timesteps=None,
            scheduler="DPMSolverMultistepScheduler",
            scheduler_config={"algorithm_type": "sde-dpmsolver++"},
        ).validate()
