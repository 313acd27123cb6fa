"""The training fast path (issue 19): ``compile:`` in the stage configs compiles the roles' transformer
blocks and gives the eager path's losses and gradients on the same batch; the combinations that
would break a contract (a compiled generator under a policy gradient) are refused before anything is built."""

from __future__ import annotations

import pytest
import torch

from rtdmd import distributed
from rtdmd.config import load
from rtdmd.train import distill, rl_step
from rtdmd.train.distill_config import DistillConfig
from rtdmd.train.rl_config import RLConfig

STAGE1_KEYS = (
    "loss/fake",
    "loss/fake_ambient",
    "loss/fake_consistency",
    "loss/generator",
    "train/grad_norm_fake",
    "train/grad_norm_generator",
)
STAGE2_KEYS = ("loss/fake", "loss/fake_consistency", "loss/dm", "loss/bp", "loss/ppo", "train/grad_norm_fake")


def compiled_blocks(net: torch.nn.Module) -> int:
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in net.transformer_blocks)


def assert_close_logs(eager: dict, fast: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert fast[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-9), key


def test_compiled_stage1_gives_the_eager_losses_and_gradients(tmp_path):
    """Two iterations (fake and generator updates, float32) with every role's blocks compiled, with and
    without gradient checkpointing (the recompute runs the compiled block): each loss and gradient norm
    equals the eager run's, and the optimiser steps leave the same weights."""
    world = distributed.init("cpu")
    runs = []
    for parts, checkpointing in (("", False), ("teacher,generator,fake", False), ("teacher,generator,fake", True)):
        overrides = ["device=cpu", "eval.every=0", "fake_updates_per_generator=1", f"compile=[{parts}]"]
        cfg = load(DistillConfig, "tiny", [*overrides, f"gradient_checkpointing={checkpointing}"], group="distill")
        sess = distill.build_session(cfg, world, tmp_path / f"{parts or 'eager'}-{checkpointing}")
        nets = (sess.models.teacher, sess.generator, sess.models.fake_run)
        assert [compiled_blocks(n) for n in nets] == [len(n.transformer_blocks) if parts else 0 for n in nets]
        assert sess.generator.is_gradient_checkpointing == checkpointing
        logs = [distill.train_step(sess, step) for step in range(2)]
        runs.append((logs, {k: p.detach().clone() for k, p in sess.gen_params.items()}))
    (eager, eager_params), *fast_runs = runs
    for fast, fast_params in fast_runs:
        for a, b in zip(eager, fast, strict=True):
            assert_close_logs(a, b, STAGE1_KEYS)
        for name, p in eager_params.items():
            torch.testing.assert_close(fast_params[name], p, rtol=1e-4, atol=1e-6)  # updates are ~1e-3


def test_compiled_stage2_keeps_the_losses_and_the_exact_ppo_ratio(tmp_path):
    """A stage-2 epoch with the teacher and the fake score compiled: the same losses and gradient
    norms as eager, and the PPO ratio at the old policy still exactly 1 (the generator stays eager)."""
    world = distributed.init("cpu")
    runs = []
    for parts in ("", "teacher,fake"):
        cfg = load(RLConfig, "tiny", ["device=cpu", "eval.every=0", f"compile=[{parts}]"], group="rl")
        sess = rl_step.build_session(cfg, world, tmp_path / (parts or "eager"))
        assert compiled_blocks(sess.models.fake_run) == (len(sess.models.fake_run.transformer_blocks) if parts else 0)
        assert compiled_blocks(sess.generator) == 0
        runs.append(rl_step.run_epoch(sess, 1))
    eager, fast = runs
    assert_close_logs(eager, fast, (*STAGE2_KEYS, "train/grad_norm_generator"))
    assert eager["ppo/ratio_deviation_max"] == fast["ppo/ratio_deviation_max"] == 0.0


@pytest.mark.parametrize(
    ("group", "schema", "overrides", "message"),
    [
        ("rl", RLConfig, ["compile=[generator]"], "PPO ratio"),
        ("distill", DistillConfig, ["compile=[vea]"], "did you mean 'vae'"),
    ],
)
def test_fast_path_combinations_that_break_a_contract_are_refused(group, schema, overrides, message):
    with pytest.raises(ValueError, match=message):
        load(schema, "tiny", ["device=cpu", *overrides], group=group)


def test_trained_roles_may_compile_under_checkpointing_and_the_generator_without_a_policy_gradient():
    cfg = load(
        DistillConfig, "tiny", ["compile=[teacher,generator,fake]", "gradient_checkpointing=true"], group="distill"
    )
    assert cfg.compile == ("teacher", "generator", "fake")
    cfg = load(RLConfig, "tiny", ["compile=[fake,vae]", "gradient_checkpointing=true"], group="rl")
    assert cfg.compile == ("fake", "vae")
    cfg = load(RLConfig, "tiny", ["arm=bp-only", "compile=[generator]"], group="rl")
    assert cfg.compile == ("generator",)
