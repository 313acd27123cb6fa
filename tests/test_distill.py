"""Stage 1 end to end on the tiny backbone: what trains, resume, multi-process, configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rtdmd import distributed
from rtdmd.config import ConfigError, load, packaged_names
from rtdmd.data import batch_indices, read_prompt_file
from rtdmd.train.cli import app
from rtdmd.train.distill import build_session, train_step
from rtdmd.train.distill_config import DistillConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_PROMPTS = ROOT.parent / "shared" / "prompts"
runner = CliRunner()


def tiny(tmp_path: Path, name: str, *overrides: str) -> DistillConfig:
    return load(DistillConfig, "tiny", [f"run_dir={tmp_path / name}", "device=cpu", *overrides], group="distill")


def checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}.safetensors"))


def test_roles_train_and_the_teacher_stays_frozen(tmp_path):
    cfg = tiny(tmp_path, "run")
    sess = build_session(cfg, distributed.init("cpu"), tmp_path)
    teacher = {k: v.clone() for k, v in sess.models.teacher.state_dict().items()}
    generator_base = {k: v.clone() for k, v in sess.generator.state_dict().items() if "lora_" not in k}
    gen = {k: v.detach().clone() for k, v in sess.gen_params.items()}
    fake = {k: v.detach().clone() for k, v in sess.fake_params.items()}
    assert gen and all("lora_" in k for k in gen) and all("lora_" in k for k in fake)
    for step in range(4):
        train_step(sess, step)
    assert all(torch.equal(v, sess.models.teacher.state_dict()[k]) for k, v in teacher.items())
    assert all(torch.equal(v, sess.generator.state_dict()[k]) for k, v in generator_base.items())
    assert sum(not torch.equal(v, sess.gen_params[k].detach()) for k, v in gen.items()) > len(gen) // 2
    assert sum(not torch.equal(v, sess.fake_params[k].detach()) for k, v in fake.items()) > len(fake) // 2
    assert not any(p.requires_grad for p in sess.models.teacher.parameters())


def test_cli_writes_checkpoints_stats_and_eval(tmp_path):
    result = runner.invoke(app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "device=cpu"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("loss/fake" in r and "loss/fake_consistency" in r for r in rows)
    assert [("loss/generator" in r) for r in rows] == [False, True, False, True]  # 2 fake : 1 generator
    assert (
        "eval/toy-geneval-quick/brightness" in rows[1] and (run / "eval/toy-geneval-quick/step_00000004.png").exists()
    )
    ckpt = checkpoint(run, 4)
    groups = {k.split("/")[0] for k in ckpt}
    assert groups == {"generator", "fake", "ema", "opt"}
    assert {k[len("ema/") :] for k in ckpt if k.startswith("ema/")} == {
        k[len("generator/") :] for k in ckpt if k.startswith("generator/")
    }


def test_four_steps_equal_two_plus_resume_plus_two_bit_for_bit(tmp_path):
    straight = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'a'}", "device=cpu", "eval.every=0"]
    )
    first = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'b'}", "device=cpu", "eval.every=0", "steps=2"]
    )
    resumed = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'b'}", "device=cpu", "eval.every=0", "steps=4"]
    )
    assert straight.exit_code == first.exit_code == resumed.exit_code == 0, resumed.output
    assert "steps 2 -> 4" in " ".join(resumed.output.split())
    a, b = checkpoint(tmp_path / "a", 4), checkpoint(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss/fake"]) for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines())]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_changed_config_is_refused_but_steps_may_grow(tmp_path):
    ok = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'a'}", "device=cpu", "eval.every=0", "steps=1"]
    )
    assert ok.exit_code == 0
    bad = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'a'}", "device=cpu", "eval.every=0", "seed=3"]
    )
    assert bad.exit_code == 2 and "seed: 0 -> 3" in " ".join(bad.output.split())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, strategy, torchrun):
    """Same global batch on 1 and 2 processes (gloo): the same samples, noise and updates, so the
    weights agree up to the reduction order of the gradient all-reduce."""
    single = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'one'}", "device=cpu", "eval.every=0"]
    )
    assert single.exit_code == 0, single.output
    torchrun(
        "rtdmd.train.cli",
        "distill",
        "--config",
        "tiny",
        f"run_dir={tmp_path / 'two'}",
        "device=cpu",
        "eval.every=0",
        f"distributed={strategy}",
    )
    one, two = checkpoint(tmp_path / "one", 4), checkpoint(tmp_path / "two", 4)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "two" / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # rank 0 alone writes the stats


def test_the_stage1_benchmark_under_torchrun_reports_the_single_process_losses(tmp_path, torchrun):
    """``bench/perf/distill_step.py`` on 2 processes with FSDP and ``--batch 1`` (per GPU) runs the same
    global batch as 1 process with ``--batch 2``: the same stops and, reduced over the ranks, the same
    losses (bf16 autocast: to rounding); rank 0 alone writes, per-GPU batch and FLOPs halve."""
    common = [
        "--family",
        "sd35m",
        "--tiny",
        "--resolution",
        "128",
        "--steps",
        "2",
        "--variant",
        "fsdp:distributed=fsdp",
    ]
    torchrun("bench.perf.distill_step", *common, "--batch", "2", "--out", str(tmp_path / "one.json"), processes=1)
    torchrun("bench.perf.distill_step", *common, "--batch", "1", "--out", str(tmp_path / "two.json"))
    single, double = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (single["processes"], double["processes"]) == (1, 2)
    a, b = single["variants"][0], double["variants"][0]
    assert (a["batch_per_gpu"], b["batch_per_gpu"], b["distributed"]) == (2, 1, "fsdp")
    assert b["model_tflops_per_iteration"] == pytest.approx(a["model_tflops_per_iteration"] / 2, rel=1e-6)
    for x, y in zip(a["steps"], b["steps"], strict=True):
        assert (x["fake_stop"], x["generator_stop"]) == (y["fake_stop"], y["generator_stop"])
        assert y["loss_fake"] == pytest.approx(x["loss_fake"], rel=1e-3)
        assert y["loss_generator"] == pytest.approx(x["loss_generator"], rel=5e-2)


def test_plain_dmd_arm_runs_and_differs(tmp_path):
    result = runner.invoke(
        app,
        [
            "distill",
            "--config",
            "tiny",
            f"run_dir={tmp_path / 'dmd'}",
            "device=cpu",
            "eval.every=0",
            "method=dmd",
            "ac=null",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "dmd" / "stats.jsonl").read_text().splitlines()]
    assert all("loss/fake_consistency" not in r for r in rows)
    bad = runner.invoke(app, ["distill", "--config", "tiny", "--dry-run", "method=dmd"])
    assert bad.exit_code == 2 and "takes `ac: null`" in " ".join(bad.output.split())


@pytest.mark.parametrize("name", packaged_names("distill"))
def test_every_shipped_config_validates_and_dry_runs(name):
    cfg = load(DistillConfig, name, group="distill")
    assert cfg.sampler.num_steps == 4 and cfg.sampler.eta == 0.9
    result = runner.invoke(app, ["distill", "--config", name, "--dry-run"])
    assert result.exit_code == 0 and f"family: {cfg.backbone.family}" in result.output


def test_shipped_configs_carry_the_paper_values():
    expect = {  # rtdmd_method.md §6.1: (resolution, teacher CFG, lr, generator source)
        "distill/sd3m": (1024, 7.0, 3e-5, ""),
        "distill/sd35m": (512, 4.5, 3e-5, ""),
        "distill/flux2_4b": (512, 4.0, 1e-6, "black-forest-labs/FLUX.2-klein-4B"),
        "distill/flux2_9b": (512, 4.0, 1e-6, "black-forest-labs/FLUX.2-klein-9B"),
        "distill/flux1_dev": (512, 3.5, 3e-5, ""),
    }
    for name, (res, w, lr, gen_source) in expect.items():
        cfg = load(DistillConfig, name, group="distill")
        assert (cfg.height, cfg.teacher_guidance, cfg.generator.optim.lr, cfg.fake.optim.lr) == (res, (w, w), lr, lr)
        assert cfg.generator.source == gen_source
        assert (cfg.generator.lora.rank, cfg.generator.lora.alpha, cfg.batch_size, cfg.fake_updates_per_generator) == (
            32,
            64.0,
            72,
            10,
        )
        assert (cfg.ac.consistency_weight, cfg.ac.consistency_max_rollback, cfg.ema_decay) == (0.01, 200, 0.99)


def test_prompt_batches_are_addressed_by_step():
    first_epoch = [i for step in range(5) for i in batch_indices(0, step, 4, 20)]
    assert sorted(first_epoch) == list(range(20))  # each prompt once per epoch
    assert batch_indices(0, 7, 4, 20) == batch_indices(0, 7, 4, 20)
    assert batch_indices(0, 5, 4, 20) != batch_indices(1, 5, 4, 20)


@pytest.mark.skipif(not SHARED_PROMPTS.exists(), reason="../shared/prompts is not checked out beside the project")
def test_training_prompt_file_is_verified_by_sha256():
    path = SHARED_PROMPTS / "pickapic" / "flowgrpo_train.txt"
    cfg = load(DistillConfig, "sd35m", group="distill")
    prompts = read_prompt_file(path, cfg.prompt_file_sha256)
    assert len(prompts) == 25432
    with pytest.raises(ValueError, match="sha256"):
        read_prompt_file(path, "0" * 64)
    with pytest.raises(ConfigError, match="prompt_file or inline prompts"):
        load(DistillConfig, "tiny", ["prompts=[]"], group="distill")
    assert dataclasses.replace(cfg, prompt_file=str(path)).prompt_file.endswith("flowgrpo_train.txt")


def test_full_fine_tuning_and_bf16_autocast_paths(tmp_path):
    """`lora: null` trains every weight of a role; bf16 weights + autocast train LoRAs kept in float32."""
    full = tiny(tmp_path, "full", "generator.lora=null", "steps=2", "eval.every=0")
    sess = build_session(full, distributed.init("cpu"), tmp_path)
    assert set(sess.gen_params) == {n for n, _ in sess.generator.named_parameters()}
    before = {k: v.detach().clone() for k, v in sess.gen_params.items()}
    for step in range(2):
        train_step(sess, step)
    assert sum(not torch.equal(v, sess.gen_params[k].detach()) for k, v in before.items()) > len(before) // 2

    half = tiny(tmp_path, "bf16", "backbone.dtype=bfloat16", "precision=bfloat16", "steps=2", "eval.every=0")
    sess = build_session(half, distributed.init("cpu"), tmp_path)
    assert all(p.dtype == torch.float32 for p in sess.gen_params.values())
    assert sess.models.teacher.dtype == torch.bfloat16
    logs = [train_step(sess, step) for step in range(2)]
    assert all(torch.isfinite(torch.tensor(v)) for row in logs for v in row.values())
    assert "loss/generator" in logs[1]


def test_export_lora_writes_rank_and_alpha_and_refuses_unfinished_runs(tmp_path):
    from bench.methods import LoraEntry, lora_alpha_over_rank
    from rtdmd.train.run_lora import export_generator_lora

    run = tmp_path / "run"
    ok = runner.invoke(
        app, ["distill", "--config", "tiny", f"run_dir={run}", "device=cpu", "eval.every=0", "checkpoint_every=1"]
    )
    assert ok.exit_code == 0, ok.output
    path = export_generator_lora(run, tmp_path / "lora.safetensors")
    exported = load_file(str(path))
    assert exported and all("lora_" in k for k in exported) and next(iter(exported.values())).dtype == torch.float16
    assert lora_alpha_over_rank(path, LoraEntry(source=str(path), kind="state_dict")) == 8.0 / 4
    (run / "checkpoints" / "step_00000004.safetensors").unlink()
    refused = runner.invoke(app, ["export-lora", str(run), "--out", str(tmp_path / "b.safetensors")])
    assert refused.exit_code == 2 and "stopped at step 3 of 4" in " ".join(refused.output.split())
    partial = runner.invoke(app, ["export-lora", str(run), "--out", str(tmp_path / "b.safetensors"), "--allow-partial"])
    assert partial.exit_code == 0 and json.loads(load_file_metadata(tmp_path / "b.safetensors"))["step"] == "3"


def load_file_metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.dumps(handle.metadata())


def test_lora_dtype_base_keeps_the_official_bf16_numerics(tmp_path):
    """``generator.lora.dtype=base`` on a bf16 backbone: the LoRA, its AdamW state and the EMA stay in
    bf16, so an update of lr 1e-6 rounds away in most weights; the float32 default keeps them."""
    moved = {}
    for dtype in ("float32", "base"):
        overrides = [
            "backbone.dtype=bfloat16",
            f"generator.lora.dtype={dtype}",
            "generator.optim.lr=1e-6",
            "fake_updates_per_generator=1",
        ]
        cfg = tiny(tmp_path, dtype, *overrides)
        sess = build_session(cfg, distributed.init("cpu"), tmp_path / dtype)
        want = torch.bfloat16 if dtype == "base" else torch.float32
        assert {p.dtype for p in sess.gen_params.values()} == {want}
        assert {t.dtype for t in sess.ema.shadow.values()} == {want}
        with torch.no_grad():  # B = 0 at the start gets no gradient in A: give B weights so every weight moves
            for name, p in sess.gen_params.items():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
        before = {k: p.detach().clone() for k, p in sess.gen_params.items()}
        train_step(sess, 0)
        states = [s for s in sess.optimizers["generator"].state.values() if "exp_avg" in s]
        assert states and {s["exp_avg"].dtype for s in states} == {want}
        changed = sum(int((p.detach() != before[k]).sum()) for k, p in sess.gen_params.items())
        moved[dtype] = changed / sum(p.numel() for p in sess.gen_params.values())
    assert moved["float32"] > 0.9 and moved["base"] < 0.1 * moved["float32"], moved  # measured: 0.93 and 0.003
