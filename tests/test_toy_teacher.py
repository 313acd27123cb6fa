"""The toy teacher: backbone adapter, checkpoints, the flow-matching pretrainer (resume, CLI)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rtdmd.backbones.base import BACKBONES, BackboneConfig, build_backbone
from rtdmd.config import load
from rtdmd.flow.schedules import shift_static
from rtdmd.toyworld.backbone import ToyBackbone, ToySpec, build_toy, load_toy, save_toy
from rtdmd.toyworld.text import UNK, token_ids, unknown_words
from rtdmd.train.cli import app
from rtdmd.train.pretrain import PretrainConfig, learning_rate, training_sigmas

runner = CliRunner()
SMALL = ToySpec(num_layers=1, num_attention_heads=2, attention_head_dim=16, text_dim=32, text_layers=1, text_heads=2)
SMALL_ARGS = [
    "model.num_layers=1",
    "model.num_attention_heads=2",
    "model.attention_head_dim=16",
    "model.text_dim=32",
    "model.text_layers=1",
    "model.text_heads=2",
]


def small_run(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    return [
        "pretrain",
        "--config",
        "toy",
        f"run_dir={tmp_path / name}",
        "device=cpu",
        "precision=float32",
        "num_examples=64",
        "render_workers=1",
        "compile=false",
        "batch_size=4",
        "warmup_steps=10",
        "log_every=1",
        "checkpoint_every=2",
        "eval.num_prompts=2",
        "eval.sampler.num_steps=2",
        "eval.rewards=[]",
        "eval.compute_batch=2",
        *SMALL_ARGS,
        *overrides,
    ]


def test_tokenizer_reads_the_closed_vocabulary():
    ids = token_ids(["a photo of two red crescents", "", "a photo of a zebra"])
    assert ids.shape == (3, 16) and (ids[1] == 0).all()
    assert UNK in ids[2].tolist() and unknown_words(["a photo of a zebra"]) == ["zebra"]
    assert UNK not in ids[0].tolist()


def test_toy_backbone_runs_cfg_and_the_empty_prompt_is_finite():
    transformer, text = build_toy(SMALL)
    backbone = ToyBackbone(transformer.eval(), text.eval())
    cond = backbone.encode(["a photo of a red circle", "a photo of three frames"], guidance=4.5)
    x = torch.randn(2, *backbone.latent_shape(64, 64))
    with torch.no_grad():
        v = backbone.velocity(transformer, x, torch.full((2,), 0.7), cond, guidance=4.5)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert backbone.latent_shape(64, 64) == (48, 16, 16)
    assert "toy" in BACKBONES.names()


def test_checkpoint_round_trip_rebuilds_the_spec_and_the_outputs(tmp_path):
    transformer, text = build_toy(SMALL, seed=3)
    path = save_toy(tmp_path / "t.safetensors", transformer, text, SMALL, dtype=torch.float32)
    loaded, loaded_text, spec = load_toy(path)
    assert spec == SMALL
    backbone = build_backbone(BackboneConfig(family="toy", source=str(path)), torch.device("cpu"))
    x, sigma = torch.randn(1, 48, 16, 16), torch.tensor([0.4])
    ref = ToyBackbone(transformer.eval(), text.eval())
    with torch.no_grad():
        a = ref.velocity(transformer, x, sigma, ref.encode(["a photo of a cross"]))
        b = backbone.velocity(backbone.transformer, x, sigma, backbone.encode(["a photo of a cross"]))
    assert torch.equal(a, b)


def test_a_checkpoint_samples_with_the_shift_it_was_trained_with(tmp_path):
    spec = dataclasses.replace(SMALL, shift=3.0)
    transformer, text = build_toy(spec)
    path = save_toy(tmp_path / "s3.safetensors", transformer, text, spec)
    backbone = build_backbone(BackboneConfig(family="toy", source=str(path)), torch.device("cpu"))
    raw = [1.0, 0.75, 0.5, 0.25]
    assert torch.allclose(backbone.schedule(4, 64, 64, raw)[1], shift_static(torch.tensor(0.75), 3.0))
    # without a spec the family default applies: shift 1, the identity on the raw times
    assert torch.allclose(ToyBackbone(transformer, text).schedule(4, 64, 64, raw), torch.tensor([*raw, 0.0]))
    with pytest.raises(ValueError, match="multiples"):
        backbone.schedule(4, 60, 60)


def test_missing_shipped_or_given_checkpoint_fails_with_the_command_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="rtdmd-train pretrain"):
        build_backbone(BackboneConfig(family="toy", source=str(tmp_path / "none.safetensors")), torch.device("cpu"))


def test_training_sigmas_follow_the_shifted_logit_normal():
    sigma = training_sigmas(torch.randn(200_000, generator=torch.Generator().manual_seed(0)), (0.0, 1.0), 3.0)
    assert sigma.min() > 0 and sigma.max() < 1
    # the median of sigmoid(n) is 1/2, and the shift is monotone: median sigma = shift(1/2) = 0.75
    assert abs(float(sigma.median()) - float(shift_static(torch.tensor(0.5), 3.0))) < 5e-3


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = load(PretrainConfig, "toy", ["steps=1000", "warmup_steps=100", "lr=1e-3"], group="pretrain")
    assert learning_rate(0, cfg) == pytest.approx(1e-5) and learning_rate(99, cfg) == pytest.approx(1e-3)
    assert learning_rate(999, cfg) == pytest.approx(1e-4, rel=1e-3)
    assert learning_rate(550, cfg) < learning_rate(300, cfg)


def test_pretrain_resumes_bit_for_bit_and_exports_the_ema_teacher(tmp_path):
    straight = runner.invoke(app, small_run(tmp_path, "a", "steps=4"))
    first = runner.invoke(app, small_run(tmp_path, "b", "steps=4"))
    (tmp_path / "b" / "checkpoints" / "step_00000004.safetensors").unlink()  # as if killed after step 2's save
    resumed = runner.invoke(app, small_run(tmp_path, "b", "steps=4"))
    assert straight.exit_code == first.exit_code == resumed.exit_code == 0, resumed.output
    assert "steps 2 -> 4" in " ".join(resumed.output.split())
    changed = runner.invoke(app, small_run(tmp_path, "b", "steps=6"))
    assert changed.exit_code == 2 and "steps: 4 -> 6" in " ".join(changed.output.split())  # fixed cosine horizon
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: Path) -> list[float]:
        rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    exported = tmp_path / "a" / "toy_teacher.safetensors"
    transformer, _, spec = load_toy(exported)
    assert spec == SMALL
    assert next(iter(load_file(str(exported)).values())).dtype == torch.float16
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 4 and (tmp_path / "a" / "eval" / "step_00000004.png").exists()


def test_packaged_pretrain_config_is_valid():
    cfg = load(PretrainConfig, "toy", [], group="pretrain")
    assert cfg.caption_dropout == 0.1 and cfg.model == ToySpec()
    bad = runner.invoke(app, ["pretrain", "--config", "toy", "caption_dropout=1.5", "--dry-run"])
    assert bad.exit_code == 2 and "caption_dropout" in bad.output


def test_velocity_at_sigma_zero_is_finite_and_gives_back_x():
    transformer, text = build_toy(SMALL)
    backbone = ToyBackbone(transformer.eval(), text.eval())
    x = torch.randn(2, 48, 16, 16)
    with torch.no_grad():
        v = backbone.velocity(transformer, x, torch.tensor([0.0, 1e-5]), backbone.encode(["a photo of a ring"] * 2))
        x0_hat = transformer(
            hidden_states=x[1:],
            timestep=torch.tensor([1e-5 * 1000]),
            encoder_hidden_states=text(["a photo of a ring"])[0],
            pooled_projections=text(["a photo of a ring"])[1],
            return_dict=False,
        )[0]
    assert torch.isfinite(v).all() and torch.equal(x[:1] - 0.0 * v[:1], x[:1])
    torch.testing.assert_close(x[1:] - 1e-5 * v[1:], x0_hat, rtol=1e-4, atol=1e-4)  # exact for sigma > 0


def test_build_is_refused_and_a_foreign_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(TypeError, match="trained"):
        ToyBackbone.build()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a toy checkpoint"):
        load_toy(tmp_path / "x.safetensors")


def test_set_metrics_are_refused_as_training_evaluation_rewards():
    from rtdmd.config import ConfigError

    with pytest.raises(ConfigError, match="toy-fd scores whole sets"):
        load(PretrainConfig, "toy", ["eval.rewards=[toy-fd]"], group="pretrain")
