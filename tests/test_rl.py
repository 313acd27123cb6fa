"""Stage 2 end to end on the tiny backbone: CLI, resume, multi-process, stage-1 start, configs, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rtdmd import distributed
from rtdmd.config import ConfigError, load, packaged_names
from rtdmd.train.cli import app
from rtdmd.train.rl_config import RLConfig
from rtdmd.train.rl_step import build_session

runner = CliRunner()


def rl(tmp_path: Path, name: str, *overrides: str):
    return runner.invoke(app, ["rl", "--config", "tiny", f"run_dir={tmp_path / name}", "device=cpu", *overrides])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def checkpoint(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{epoch:08d}.safetensors"))


def test_cli_runs_every_part_and_writes_checkpoints_stats_and_eval(tmp_path):
    result = rl(tmp_path, "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    stats = rows(run)
    assert [r["step"] for r in stats] == [1, 2, 3, 4]
    for key in ("reward/brightness", "loss/ppo", "loss/dm", "loss/bp", "loss/fake", "loss/fake_consistency"):
        assert all(key in r for r in stats), key
    assert all(r["ppo/ratio_deviation_max"] == 0.0 for r in stats)  # recomputed on the rollout's own batch
    assert (
        "eval/toy-geneval-quick/brightness" in stats[1] and (run / "eval/toy-geneval-quick/step_00000004.png").exists()
    )
    assert {k.split("/")[0] for k in checkpoint(run, 4)} == {"generator", "fake", "ema", "opt"}
    exported = runner.invoke(app, ["export-lora", str(run), "--out", str(tmp_path / "lora.safetensors")])
    assert exported.exit_code == 0, exported.output


def test_four_epochs_equal_two_plus_resume_plus_two_bit_for_bit(tmp_path):
    straight = rl(tmp_path, "a", "eval.every=0")
    first = rl(tmp_path, "b", "eval.every=0", "epochs=2")
    resumed = rl(tmp_path, "b", "eval.every=0", "epochs=4")
    assert straight.exit_code == first.exit_code == resumed.exit_code == 0, resumed.output
    assert "epochs 2 -> 4" in " ".join(resumed.output.split())
    a, b = checkpoint(tmp_path / "a", 4), checkpoint(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time", "time/epoch_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "a")] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "b")
    ]


def test_the_stage2_benchmark_under_torchrun_reports_the_single_process_epoch(tmp_path, torchrun, monkeypatch):
    """``bench/perf/rl_epoch.py`` on 2 processes with FSDP and ``--batch 2`` (per GPU) runs the global
    batch of 1 process with ``--batch 4`` (groups of 2 either way): the same trained steps and, reduced
    over the ranks, the same losses to bf16 rounding (the reward BP loss, a margin crossing, to 10%);
    the PPO ratio at the old policy stays exactly 1; rank 0 alone writes; no process leaves its reward
    weights behind (about 7.6 GB each at released sizes)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    common = ["--family", "sd35m", "--tiny", "--warmup-iterations", "1", "--iterations", "2", "--group", "2"]
    common += ["--variant", "fsdp:distributed=fsdp"]
    torchrun("bench.perf.rl_epoch", *common, "--batch", "4", "--out", str(tmp_path / "one.json"), processes=1)
    torchrun("bench.perf.rl_epoch", *common, "--batch", "2", "--out", str(tmp_path / "two.json"))
    single, double = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (single["processes"], double["processes"], single["batch_per_gpu"], double["batch_per_gpu"]) == (1, 2, 4, 2)
    assert single["group_size"] == double["group_size"] == 2
    (a,), (b,) = single["variants"][0]["epochs"], double["variants"][0]["epochs"]
    assert double["variants"][0]["distributed"] == "fsdp" and a["trained_steps"] == b["trained_steps"]
    assert b["loss_fake"] == pytest.approx(a["loss_fake"], rel=1e-3)
    assert b["loss_dm"] == pytest.approx(a["loss_dm"], rel=1e-2)
    assert b["loss_bp"] == pytest.approx(a["loss_bp"], rel=0.1)
    assert a["ppo_ratio_deviation_max"] == b["ppo_ratio_deviation_max"] == 0.0
    weights = [p for p in scratch.rglob("*") if p.suffix in {".safetensors", ".pt", ".bin"}]
    assert not weights, weights


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, torchrun, strategy):
    """The same epoch on 1 and 2 processes (gloo): the same prompts, noise, advantages and updates,
    so the weights agree up to the reduction order of the gradient all-reduce."""
    single = rl(tmp_path, "one", "eval.every=0", "epochs=2")
    assert single.exit_code == 0, single.output
    torchrun(
        "rtdmd.train.cli",
        "rl",
        "--config",
        "tiny",
        f"run_dir={tmp_path / 'two'}",
        "device=cpu",
        "eval.every=0",
        "epochs=2",
        f"distributed={strategy}",
    )
    one, two = checkpoint(tmp_path / "one", 2), checkpoint(tmp_path / "two", 2)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    stats_one, stats_two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert len(stats_two) == 2  # rank 0 alone writes the stats
    assert stats_two[0]["reward/brightness"] == pytest.approx(stats_one[0]["reward/brightness"], abs=1e-6)


def test_a_reward_preferring_brighter_images_rises_within_a_few_dozen_epochs(tmp_path):
    result = rl(tmp_path, "bright", "eval.every=0", "epochs=24", "checkpoint_every=24", "generator.optim.lr=1e-2")
    assert result.exit_code == 0, result.output
    reward = [r["reward/brightness"] for r in rows(tmp_path / "bright")]
    early, late = sum(reward[:4]) / 4, sum(reward[-4:]) / 4
    assert late > early + 0.02, reward  # measured: 0.502 -> 0.549 (group std ~0.004 per epoch)


def test_stage_two_starts_from_the_stage_one_ema_generator(tmp_path):
    """Merging the stage-1 EMA LoRA and attaching a fresh one (B = 0) leaves the generator's
    outputs those of the stage-1 EMA generator; the fake score likewise starts from stage 1's."""
    from rtdmd.train import distill, state

    stage1 = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 's1'}", "device=cpu", "eval.every=0"]
    )
    assert stage1.exit_code == 0, stage1.output
    world = distributed.init("cpu")
    cfg1 = load(distill.DistillConfig, "tiny", [f"run_dir={tmp_path / 's1'}", "device=cpu"], group="distill")
    sess1 = distill.build_session(cfg1, world, tmp_path / "s1")
    state.load(state.latest_checkpoint(tmp_path / "s1")[1], sess1.roles, sess1.ema)
    cfg2 = load(RLConfig, "tiny", [f"stage1.run={tmp_path / 's1'}", "device=cpu"], group="rl")
    sess2 = build_session(cfg2, world, tmp_path / "s2")
    x = torch.randn(2, *sess2.models.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = sess2.models.backbone.encode(["a red circle", "three purple stars"])
    with torch.no_grad(), sess1.ema.swapped_in(sess1.gen_params):
        expected = sess1.models.backbone.velocity(sess1.generator, x, 0.75, cond)
        expected_fake = sess1.models.backbone.velocity(sess1.models.fake_run, x, 0.75, cond)
    with torch.no_grad():
        ours = sess2.models.backbone.velocity(sess2.generator, x, 0.75, cond)
        ours_fake = sess2.models.backbone.velocity(sess2.models.fake_run, x, 0.75, cond)
        base = sess2.models.backbone.velocity(sess2.models.teacher, x, 0.75, cond)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_fake, expected_fake, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-5)  # the merge did change the weights
    fresh = [p for name, p in sess2.gen_params.items() if "lora_A" in name]
    assert fresh and abs(float(torch.cat([p.detach().flatten() for p in fresh]).std()) - 1) < 0.2  # A ~ N(0, 1)


@pytest.mark.parametrize("name", packaged_names("rl"))
def test_every_shipped_config_validates_and_dry_runs(name):
    cfg = load(RLConfig, name, group="rl")
    assert cfg.sampler.num_steps == 4 and cfg.sampler.eta == 0.9 and cfg.arm == "rtdmd"
    result = runner.invoke(app, ["rl", "--config", name, "--dry-run"])
    assert result.exit_code == 0 and f"family: {cfg.backbone.family}" in result.output


def test_shipped_configs_carry_the_paper_values():
    expect = {  # rtdmd_method.md §6.2: resolution, G, images per sampler iteration, teacher CFG, fake lr, consistency
        "rl/sd3m": (1024, 16, 32, 7.0, 3e-5, 0.01),
        "rl/sd35m": (512, 24, 72, 4.5, 3e-5, 0.01),
        "rl/flux2_4b": (512, 24, 96, 4.0, 1e-6, 0.01),
        "rl/flux2_9b": (512, 24, 96, 4.0, 1e-6, 0.0),
        "rl/flux1_dev": (512, 24, 96, 3.5, 1e-6, 0.0),
    }
    for name, (res, group, batch, w, fake_lr, gamma) in expect.items():
        cfg = load(RLConfig, name, group="rl")
        assert (cfg.height, cfg.grpo.group_size, cfg.batch_size, cfg.teacher_guidance) == (res, group, batch, (w, w))
        assert (cfg.fake.optim.lr, cfg.fake_objective.consistency_weight) == (fake_lr, gamma)
        assert (cfg.generator.optim.lr, cfg.generator.optim.weight_decay, cfg.iterations_per_epoch) == (3e-6, 1e-4, 16)
        assert (cfg.grpo.steps_per_epoch, cfg.grpo.step_range, cfg.grpo.advantage_clip) == (2, (0, 2), 5.0)
        assert (cfg.dm.weight, cfg.bp.scale, cfg.bp.margin) == (1e-3, 1e-4, 3.0)
        assert (cfg.ema.decay, cfg.ema.every, cfg.generator.lora.init) == (0.9, 8, "normal")
        assert {t.name: t.weight for t in cfg.rewards} == {
            "clipscore": 1.0,
            "hpsv21": 1.0,
            "pickscore": 1.0,
            "geneval-partial": 1.0,
        }


def test_bad_configs_fail_with_one_clear_line():
    with pytest.raises(ConfigError, match="none of .* is differentiable"):
        load(RLConfig, "tiny", ["rewards=[{name: toy-geneval}]"], group="rl")
    with pytest.raises(ConfigError, match="step_range"):
        load(RLConfig, "tiny", ["grpo.step_range=[0, 3]"], group="rl")
    with pytest.raises(ConfigError, match="multiple of grpo.group_size"):
        load(RLConfig, "tiny", ["batch_size=6"], group="rl")
    with pytest.raises(ConfigError, match="arm"):
        load(RLConfig, "tiny", ["arm=no-ppo"], group="rl")
    bad = runner.invoke(app, ["rl", "--config", "tiny", "--dry-run", "grpo.steps_per_epoch=4"])
    assert bad.exit_code == 2 and "steps_per_epoch" in bad.output


def test_a_resumed_run_refuses_other_stage_one_weights(tmp_path):
    stage1 = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 's1'}", "device=cpu", "eval.every=0", "steps=2"]
    )
    assert stage1.exit_code == 0, stage1.output
    first = rl(tmp_path, "rl", f"stage1.run={tmp_path / 's1'}", "eval.every=0", "epochs=1")
    assert first.exit_code == 0, first.output
    more = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 's1'}", "device=cpu", "eval.every=0", "steps=4"]
    )
    assert more.exit_code == 0, more.output
    again = rl(tmp_path, "rl", f"stage1.run={tmp_path / 's1'}", "eval.every=0", "epochs=2")
    assert again.exit_code == 2 and "started from stage-1 weights" in " ".join(again.output.split())


def test_a_method_card_loads_a_stage_two_run_over_its_stage_one(tmp_path):
    """`kind: rtdmd` on an rl run: base, then the stage-1 run's EMA LoRA, then the rl run's EMA LoRA
    (both rank 4, alpha 8), as merged by hand from the checkpoint files."""
    import dataclasses

    from bench.methods import LoraEntry, build_method, load_method
    from rtdmd.lora import merge_lora_state_dict

    stage1 = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 's1'}", "device=cpu", "steps=2", "eval.every=0"]
    )
    assert stage1.exit_code == 0, stage1.output
    stage2 = rl(tmp_path, "s2", "eval.every=0", "epochs=1", f"stage1.run={tmp_path / 's1'}")
    assert stage2.exit_code == 0, stage2.output
    base = load_method("tiny-cps4")
    card = dataclasses.replace(base, loras=(LoraEntry(source=str(tmp_path / "s2"), kind="rtdmd"),))
    _, loaded = build_method(card, torch.device("cpu"))
    _, by_hand = build_method(base, torch.device("cpu"))
    for run, step in (("s1", 2), ("s2", 1)):
        ema = {k[len("ema/") :]: v for k, v in checkpoint(tmp_path / run, step).items() if k.startswith("ema/")}
        merge_lora_state_dict(by_hand, ema, 8.0 / 4)
        if run == "s1":
            after_stage1 = {k: v.clone() for k, v in by_hand.state_dict().items()}
    got, want = loaded.state_dict(), by_hand.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], after_stage1[k]) for k in want)  # stage 2 moved the weights
