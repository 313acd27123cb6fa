"""Toy-world rewards (toy-geneval, toy-clip, toy-aesthetic, toy-fd), ToyClip and its trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdmd import weights
from rtdmd.config import ConfigError, load
from rtdmd.geneval.judge import TAGS
from rtdmd.rewards import REWARDS
from rtdmd.seeding import seed_for
from rtdmd.toyworld import rewards as toy_rewards
from rtdmd.toyworld.clip import ToyClip, ToyClipArch, canonical, caption_negatives, spellings
from rtdmd.toyworld.data import eval_metadata
from rtdmd.toyworld.prompts import scene_for
from rtdmd.toyworld.world import Obj, render
from rtdmd.train import pretrain_clip as trainer

# a ToyClip small enough for CPU tests; the reward code paths are the same as at full size
SMALL = ToyClipArch(
    widths=(8, 8, 16, 16),
    groups=4,
    map_channels=4,
    feature_dim=16,
    text_width=16,
    text_layers=2,
    text_heads=2,
    embed_dim=8,
)


def as_float(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "small.safetensors"
    ToyClip(SMALL, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def ground_truth():
    metadata = list(eval_metadata())
    pixels = [render(scene_for(m, seed_for("test-gt", i))) for i, m in enumerate(metadata)]
    return as_float(pixels), [m["prompt"] for m in metadata], metadata


# ---------------------------------------------------------------- toy-geneval


def test_toy_geneval_judges_rendered_ground_truth_correct(ground_truth):
    images, prompts, metadata = ground_truth
    toy_rewards._DETECTIONS.clear()
    official = REWARDS.get("toy-geneval")()(images, prompts, metadata)
    strict = REWARDS.get("toy-geneval-strict")()(images, prompts, metadata)
    partial = REWARDS.get("toy-geneval-partial")()(images, prompts, metadata)
    wrong = [p for p, s in zip(prompts, official, strict=True) if s != 1]
    assert official.shape == (len(prompts),) and not wrong, wrong
    assert bool((strict == 1).all())
    by_tag = {tag: [float(s) for s, m in zip(partial, metadata, strict=True) if m["tag"] == tag] for tag in TAGS}
    assert np.mean([np.mean(v) for v in by_tag.values()]) >= 0.99
    info = REWARDS.get("toy-geneval").info
    assert info.aggregate == "category_mean" and info.needs == ("tag", "include") and not info.differentiable


def test_toy_geneval_scores_wrong_colour_and_missing_object_zero():
    colors = next(m for m in eval_metadata() if m["tag"] == "colors")
    (obj,) = scene_for(colors, 0)
    other = "blue" if obj.color != "blue" else "red"
    two = next(m for m in eval_metadata() if m["tag"] == "two_object")
    objects = scene_for(two, 0)
    images = as_float([render([Obj(obj.shape, other, obj.cx, obj.cy, obj.size)]), render(objects[:1])])
    meta = [colors, two]
    prompts = [m["prompt"] for m in meta]
    assert REWARDS.get("toy-geneval")()(images, prompts, meta).tolist() == [0.0, 0.0]
    assert REWARDS.get("toy-geneval-strict")()(images, prompts, meta).tolist() == [0.0, 0.0]
    assert (REWARDS.get("toy-geneval-partial")()(images, prompts, meta) < 1).all()


def test_three_geneval_metrics_detect_each_image_once(monkeypatch):
    from rtdmd.toyworld import detector

    calls = []
    real = detector.detect
    monkeypatch.setattr(detector, "detect", lambda pixels, scorer: calls.append(scorer) or real(pixels, scorer))
    toy_rewards._DETECTIONS.clear()
    meta = [m for m in eval_metadata() if m["tag"] == "single_object"][:3]
    images = as_float([render(scene_for(m, 7)) for m in meta])
    prompts = [m["prompt"] for m in meta]
    for name in ("toy-geneval", "toy-geneval-strict", "toy-geneval-partial"):
        REWARDS.get(name)()(images, prompts, meta)
    assert calls == ["learned"] * 3
    REWARDS.get("toy-geneval-fit")()(images, prompts, meta)  # another scorer: its own detections
    assert calls == ["learned"] * 3 + ["fit"] * 3
    # a change below half a grey level gives the same PNG pixels, hence the cached detection
    REWARDS.get("toy-geneval")()((images + 0.4 / 255).clamp(0, 1), prompts, meta)
    assert len(calls) == 6
    REWARDS.get("toy-geneval")()((images + 0.6 / 255).clamp(0, 1), prompts, meta)
    assert len(calls) == 9


# ---------------------------------------------------------------- toy-aesthetic


def test_toy_aesthetic_orders_clean_noisy_random_and_has_gradients(ground_truth):
    images = ground_truth[0][:32]
    gen = torch.Generator().manual_seed(0)
    reward = REWARDS.get("toy-aesthetic")()
    clean = reward(images, [""] * 32, [{}] * 32)
    noisy = reward((images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1), [""] * 32, [{}] * 32)
    random = reward(torch.rand(images.shape, generator=gen), [""] * 32, [{}] * 32)
    assert clean.min() >= 9.0 and clean.max() <= 10.0
    assert noisy.max() < clean.min() - 1.5
    assert random.max() < noisy.min()
    x = (images[:4] + 0.05 * torch.randn(images[:4].shape, generator=gen)).clamp(0, 1).requires_grad_(True)
    reward(x, [""] * 4, [{}] * 4).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert REWARDS.get("toy-aesthetic").info.differentiable


def test_toy_aesthetic_of_flat_colours_is_exactly_ten_with_no_gradient():
    """On a pixel drawn in a flat colour the other colours' kernels add up to 3e-3; the min(1, .)
    holds the score at exactly 10 and leaves nothing to improve (zero gradient)."""
    from rtdmd.toyworld.world import BACKGROUND, PALETTE

    colours = torch.tensor([*PALETTE.values(), BACKGROUND], dtype=torch.float32) / 255
    flat = colours.view(11, 3, 1, 1).expand(11, 3, 8, 8).clone().requires_grad_(True)
    scores = toy_rewards.flat_colour_score(flat)
    assert torch.equal(scores, torch.full((11,), 10.0))
    scores.sum().backward()
    assert torch.count_nonzero(flat.grad) == 0


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_forms():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=gen) + 0.1, torch.rand(6, generator=gen) + 0.1
    mu1, mu2 = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    expected = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    fd = toy_rewards.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd.dtype == torch.float64 and torch.allclose(fd, expected.double(), atol=1e-10)
    # a rotation of both Gaussians leaves the distance unchanged
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    rotated = toy_rewards.frechet_distance(
        q @ mu1.double(), q @ torch.diag(a).double() @ q.T, q @ mu2.double(), q @ torch.diag(b).double() @ q.T
    )
    assert torch.allclose(rotated, fd, atol=1e-10)
    # S1 = I and a non-diagonal S2: tr(S1 + S2 - 2 S2^{1/2}) with S2's eigenvalues
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    s2 = m @ m.T + 0.1 * torch.eye(6, dtype=torch.float64)
    eig = np.linalg.eigvalsh(s2.numpy())
    expected = 6 + eig.sum() - 2 * np.sqrt(eig).sum()
    zero = torch.zeros(6, dtype=torch.float64)
    assert abs(float(toy_rewards.frechet_distance(zero, torch.eye(6), zero, s2)) - expected) < 1e-9
    # two covariances that do not commute: tr (S1 S2)^{1/2} is the sum of the square roots of the
    # (real, positive) eigenvalues of S1 S2, which differs from tr(S1^{1/2} S2^{1/2}) here
    n = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    s1 = n @ n.T + 0.1 * torch.eye(6, dtype=torch.float64)
    cross = np.sqrt(np.linalg.eigvals(s1.numpy() @ s2.numpy()).real).sum()
    expected = (
        float((mu1.double() - mu2.double()).pow(2).sum()) + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * cross
    )
    assert abs(float(toy_rewards.frechet_distance(mu1, s1, mu2, s2)) - expected) < 1e-9
    commuting_formula = np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(sqrtm_psd(s1) @ sqrtm_psd(s2))
    assert (
        abs(commuting_formula - (expected - float((mu1.double() - mu2.double()).pow(2).sum()))) > 0.1
    )  # the case bites


def sqrtm_psd(matrix: torch.Tensor) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix.numpy())
    return (vectors * np.sqrt(values)) @ vectors.T


def test_gaussian_stats_and_fd_of_a_set_with_itself():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(1))
    mu, cov = toy_rewards.gaussian_stats(x)
    assert np.allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False)) and np.allclose(mu, x.double().mean(0))
    assert abs(float(toy_rewards.frechet_distance(mu, cov, mu, cov))) < 1e-9
    with pytest.raises(ValueError, match="at least 2"):
        toy_rewards.gaussian_stats(x[:1])


def test_toy_fd_is_small_for_renders_and_large_for_noise(clip_path, ground_truth):
    images, prompts, metadata = ground_truth
    fd = REWARDS.get("toy-fd")(clip_path)
    assert fd.info.aggregate == "set" and not fd.info.higher_is_better and not fd.info.differentiable
    same = fd(toy_rewards.reference_renders(prompts, metadata), prompts, metadata)
    renders = fd(images, prompts, metadata)  # other scenes of the same prompts
    noise = fd(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)), prompts, metadata)
    assert same.ndim == 0 and abs(float(same)) < 1e-6
    # even random (seeded) features tell noise from renders; the shipped model's test asks for more
    assert 0 < float(renders) < float(noise) / 2


def test_reference_renders_differ_per_occurrence_of_a_prompt():
    meta = [eval_metadata()[0]] * 2
    refs = toy_rewards.reference_renders([meta[0]["prompt"]] * 2, meta)
    again = toy_rewards.reference_renders([meta[0]["prompt"]], meta[:1])
    assert torch.equal(refs[0], again[0]) and not torch.equal(refs[0], refs[1])


# ---------------------------------------------------------------- ToyClip and toy-clip


def test_toy_clip_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = ToyClip(SMALL, seed=0), ToyClip(SMALL, seed=0), ToyClip(SMALL, seed=1)
    assert torch.equal(torch.rand(3), before)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.image_proj.weight, c.image_proj.weight)
    assert 0.5e6 < sum(p.numel() for p in ToyClip().parameters()) < 1.5e6  # the default size


def test_toy_clip_save_load_round_trip(clip_path, tmp_path):
    model = ToyClip.load(clip_path)
    assert model.arch == SMALL and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a red circle", "a photo of two rings", ""]
    again = tmp_path / "again.safetensors"
    model.save(again)
    reloaded, fresh = ToyClip.load(again), ToyClip(SMALL, seed=0)
    assert all(
        torch.equal(p, q) for p, q in zip(reloaded.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    # frozen parameters let torch take the fused attention path: equal up to float rounding
    assert torch.allclose(reloaded(images, prompts), fresh.eval()(images, prompts).detach(), atol=1e-6)
    from rtdmd.checkpoint import save_tensors

    save_tensors({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a ToyClip checkpoint"):
        ToyClip.load(tmp_path / "other.safetensors")


def test_toy_clip_reward_is_batch_invariant_and_differentiable(clip_path):
    reward = REWARDS.get("toy-clip")(clip_path)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = [
        "a photo of a red circle",
        "",
        "a photo of an orange ring and a yellow frame",
        "zebra",
        "a photo of a crescent left of a square",
    ]
    batch = reward(images, prompts, [{}] * 5)
    alone = torch.cat([reward(images[i : i + 1], prompts[i : i + 1], [{}]) for i in range(5)])
    assert batch.shape == (5,) and torch.isfinite(batch).all() and (batch.abs() <= 1 + 1e-6).all()
    assert torch.allclose(batch, alone, atol=1e-5)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)  # resized to 64
    reward(x, prompts[:2], [{}] * 2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert REWARDS.get("toy-clip").info.differentiable and REWARDS.get("toy-clip").info.units == "raw cosine"


def test_toy_clip_reads_the_env_path_and_explains_a_missing_checkpoint(clip_path, monkeypatch):
    monkeypatch.setenv(toy_rewards.CLIP_ENV, str(clip_path))
    assert REWARDS.get("toy-clip")().model.arch == SMALL
    monkeypatch.delenv(toy_rewards.CLIP_ENV)

    def missing(name):
        raise weights.WeightsError(f"no shipped toy checkpoint {name!r}")

    monkeypatch.setattr(toy_rewards, "packaged", missing)  # where the toy metric looks it up
    with pytest.raises(weights.WeightsError, match="rtdmd-train pretrain-clip --config toy"):
        REWARDS.get("toy-clip")()


def test_shipped_toy_clip_prefers_true_captions(ground_truth, monkeypatch):
    monkeypatch.delenv(toy_rewards.CLIP_ENV, raising=False)
    images, prompts, metadata = ground_truth
    reward = REWARDS.get("toy-clip")()
    true = reward(images, prompts, metadata)
    shuffled = reward(images, prompts[1:] + prompts[:1], metadata)
    negatives = [next(iter(caption_negatives(p).values()))[0] for p in prompts]
    one_detail = reward(images, negatives, metadata)
    assert (true > shuffled).float().mean() > 0.95
    assert (true > one_detail).float().mean() > 0.8
    fd = REWARDS.get("toy-fd")()
    assert float(fd(images, prompts, metadata)) < 0.1 * float(fd(torch.rand(images.shape), prompts, metadata))


# ---------------------------------------------------------------- captions and training


def test_caption_negatives_change_one_detail_and_spellings_keep_the_meaning():
    prompt = "a photo of an orange ring and a yellow frame"
    negatives = caption_negatives(prompt)
    assert negatives["binding"] == ["a photo of a yellow ring and an orange frame"]
    assert "a photo of a red ring and a yellow frame" in negatives["color"]
    assert all(canonical(n) != canonical(prompt) for kind in negatives.values() for n in kind)
    position = "a photo of a circle right of a crescent"
    assert caption_negatives(position)["relation"] == ["a photo of a circle left of a crescent"]
    assert spellings(position) == [position, "a photo of a crescent left of a circle"]
    assert len({canonical(s) for s in spellings(position)}) == 1
    assert caption_negatives("a photo of three crosses")["count"] == [
        "a photo of two crosses",
        "a photo of four crosses",
    ]
    assert canonical("a photo of a circle and a square") == canonical("a photo of a square and a circle")


def test_negative_table_draws_every_kind_each_step():
    from rtdmd.toyworld.text import token_ids

    captions = ["a photo of an orange ring and a yellow frame", "a photo of a circle"]
    table = trainer.NegativeTable.build(captions)
    drawn = table.sample(torch.tensor([0, 0, 1]), 3, torch.Generator().manual_seed(0))
    kinds = caption_negatives(captions[0])
    rows = [token_ids(v) for v in kinds.values()]  # colour, binding, shape
    for slot, options in enumerate(rows):
        for b in (0, 1):
            assert (drawn[b, slot] == options).all(-1).any()
    assert (drawn[2] == token_ids(caption_negatives(captions[1])["shape"])[:, None]).all(-1).any(0).all()


def test_losses_and_schedule():
    cfg = trainer.ToyClipConfig(lr=1.0, warmup=10, steps=110)
    assert trainer.learning_rate(cfg, 0) == pytest.approx(0.1) and trainer.learning_rate(cfg, 9) == pytest.approx(1.0)
    assert trainer.learning_rate(cfg, 60) == pytest.approx(0.5) and trainer.learning_rate(cfg, 110) == pytest.approx(
        0.0
    )
    e = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(100.0)
    assert trainer.contrastive_loss(e, e, scale) < 1e-3
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    dup = e.clone()
    dup[1] = dup[0]  # two captions that mean the same: not negatives of each other
    assert trainer.contrastive_loss(dup, dup, scale, same) < 1e-3 < trainer.contrastive_loss(dup, dup, scale)
    assert trainer.hard_negative_loss(e, e, -e[:, None], scale) < 1e-3
    assert trainer.hard_negative_loss(e, -e, e[:, None], scale) > 1


def test_packaged_recipe_loads_and_unknown_keys_fail():
    cfg = load(trainer.ToyClipConfig, "toy", [], group="pretrain_clip")
    assert cfg.batch_size == 512 and cfg.arch == ToyClipArch() and cfg.precision == "bfloat16"
    with pytest.raises(ConfigError, match="unknown key"):
        load(trainer.ToyClipConfig, "toy", ["batchsize=4"], group="pretrain_clip")


def smoke_overrides(run: Path, *extra: str) -> list[str]:
    return [
        "num_examples=64",
        "render_workers=1",
        "batch_size=16",
        "steps=4",
        "warmup=1",
        "precision=float32",
        "log_every=2",
        "negatives_per_caption=2",
        "device=cpu",
        f"run_dir={run}",
        *(f"arch.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in vars(SMALL).items()),
        *extra,
    ]


def test_an_interrupted_toy_clip_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Checkpoint every 2 steps; interrupted in step 3, then rerun: the same ToyClip weights, held-out
    metrics and stats rows as a run that never stopped."""
    straight = trainer.train(
        load(
            trainer.ToyClipConfig, "toy", smoke_overrides(tmp_path / "a", "checkpoint_every=2"), group="pretrain_clip"
        ),
        False,
    )
    step = trainer.train_step

    def interrupted(cfg, model, pool, negatives, index):
        if index == 2:
            raise KeyboardInterrupt
        return step(cfg, model, pool, negatives, index)

    cfg = load(
        trainer.ToyClipConfig, "toy", smoke_overrides(tmp_path / "b", "checkpoint_every=2"), group="pretrain_clip"
    )
    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, False)
    monkeypatch.setattr(trainer, "train_step", step)
    resumed = trainer.train(cfg, False)
    from safetensors.torch import load_file

    got, want = load_file(resumed["checkpoint"]), load_file(straight["checkpoint"])  # their configs name other run_dirs
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["final"] == straight["final"]

    def rows(run):
        return [
            {k: v for k, v in r.items() if not k.startswith("time")}
            for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines())
        ]

    assert rows(tmp_path / "b") == rows(tmp_path / "a") and len(rows(tmp_path / "a")) == 2


def test_trainer_smoke_run(tmp_path):
    overrides = smoke_overrides(tmp_path / "run")
    cfg = load(trainer.ToyClipConfig, "toy", overrides, group="pretrain_clip")
    summary = trainer.train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss/contrastive"]) for r in rows)
    assert 0 <= summary["final"]["eval/retrieval_i2t_top1"] <= 1 and "eval/true_beats_binding" in summary["final"]
    model = ToyClip.load(summary["checkpoint"])
    assert model.arch == SMALL
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()
    assert trainer.train(cfg, show_progress=False)["skipped"]


def test_the_toy_clip_metric_versions_name_the_shipped_weights():
    version = REWARDS.get("toy-clip").info.version
    assert REWARDS.get("toy-fd").info.version == version
    assert weights.expected_sha256()["toy_clip.safetensors"] == toy_rewards.TOY_CLIP_SHA256[version], (
        "toy_clip was re-shipped: bump the toy-clip and toy-fd versions and record the new sha256"
    )


def test_the_toy_geneval_version_names_the_shipped_recogniser():
    version = toy_rewards.TOY_GENEVAL_VERSION
    for name in ("toy-geneval", "toy-geneval-strict", "toy-geneval-partial", "toy-geneval-fit"):
        assert REWARDS.get(name).info.version == version
    assert weights.expected_sha256()["toy_recognizer.safetensors"] == toy_rewards.TOY_RECOGNIZER_SHA256[version], (
        "toy_recognizer was re-shipped: bump TOY_GENEVAL_VERSION and record the new sha256"
    )
