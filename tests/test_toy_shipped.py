"""The shipped toy checkpoints: verified on load, each with a model card, wired into the toy methods."""

from __future__ import annotations

import shutil

import pytest
import torch

from bench.methods import MethodError, build_method, load_method
from rtdmd import weights
from rtdmd.sampling import generate
from rtdmd.toyworld.data import eval_metadata

ARMS = ("grpo_all_steps", "no_bp", "no_dm", "bp_only", "dmd_only")
SHIPPED = (
    "toy_teacher",
    "toy_clip",
    "toy_recognizer",
    "toy_acdmd",
    "toy_dmd",
    "toy_rtdmd",
    *(f"toy_rtdmd_{arm}" for arm in ARMS),
)
TOY_METHODS = ("toy-teacher", "toy-euler4", "toy-dmd", "toy-acdmd", "toy-rtdmd")


def test_every_shipped_checkpoint_is_verified_and_has_a_model_card():
    sums = weights.expected_sha256()
    assert sorted(sums) == sorted(f"{n}.safetensors" for n in SHIPPED)
    for name in SHIPPED:
        assert weights.packaged(name).is_file()
        card = (weights.SHIPPED_ROOT / f"{name}.md").read_text()
        for field in ("command", "seed", "hardware", "wall time"):
            assert field in card, f"{name}.md lacks {field}"
    total = sum((weights.SHIPPED_ROOT / f).stat().st_size for f in sums)
    assert total < 60e6, f"shipped checkpoints take {total / 1e6:.1f} MB"  # the bound for all of them


def test_a_modified_or_unknown_checkpoint_is_refused(tmp_path, monkeypatch):
    shutil.copytree(weights.SHIPPED_ROOT, tmp_path / "weights")
    monkeypatch.setattr(weights, "SHIPPED_ROOT", tmp_path / "weights")
    monkeypatch.setattr(weights, "SUMS", tmp_path / "weights" / "SHA256SUMS")
    path = tmp_path / "weights" / "toy_dmd.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="modified"):
        weights.packaged("toy_dmd")
    with pytest.raises(weights.WeightsError, match="no shipped toy checkpoint 'toy_rtdmd_v2'"):
        weights.packaged("toy_rtdmd_v2")
    with pytest.raises(MethodError, match="modified"):
        build_method(load_method("toy-dmd"), torch.device("cpu"))


def test_toy_methods_build_and_the_students_differ_from_their_base():
    prompts = [m["prompt"] for m in eval_metadata()[:2]]
    keys = [("toy-geneval/00000", 0), ("toy-geneval/00001", 0)]
    images = {}
    for name in TOY_METHODS:
        card = load_method(name)
        backbone, net = build_method(card, torch.device("cpu"))
        spec = card.sampler if card.sampler.num_steps <= 4 else type(card.sampler)(num_steps=2, eta=0.0, guidance=4.5)
        images[name] = generate(backbone, net, prompts, keys, spec, run_seed=0, height=64, width=64, compute_batch=2)
        assert images[name].shape == (2, 3, 64, 64) and torch.isfinite(images[name]).all()
    base_backbone, base_net = build_method(load_method("toy-teacher"), torch.device("cpu"))
    student_spec = load_method("toy-acdmd").sampler
    base = generate(
        base_backbone, base_net, prompts, keys, student_spec, run_seed=0, height=64, width=64, compute_batch=2
    )
    for name in ("toy-dmd", "toy-acdmd"):
        assert (images[name] - base).abs().mean() > 1e-2, f"{name}: the LoRA changed nothing"
    assert (images["toy-rtdmd"] - images["toy-acdmd"]).abs().mean() > 1e-3, "the stage-2 LoRA changed nothing"
    assert (images["toy-dmd"] - images["toy-acdmd"]).abs().mean() > 1e-2


@pytest.mark.slow
def test_the_default_run_reproduces_the_committed_toy_leaderboard(tmp_path, monkeypatch):
    """`rtdmd-bench run` from scratch (the quick profile, minutes on 2 cores) gives the committed
    numbers of reports/toy/quick/ (the same run, committed as what the README's command prints)."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from bench.cli import app

    committed = json.loads((Path(__file__).resolve().parents[1] / "reports/toy/quick/leaderboard.json").read_text())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 0, result.output
    fresh = json.loads((tmp_path / "bench_runs/toy-geneval-quick_leaderboard.json").read_text())
    assert fresh["tables"] == committed["tables"] and fresh["claims"] == committed["claims"]
