"""Claims' significance (bench/claim_stats.py): the difference, the paired bootstrap and the one-sided
p-value, recomputed here from the run files with numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bench.claim_stats import SET_BOOT, significance
from bench.claims import ClaimCard, ClaimError, check, claims_section
from rtdmd.config import from_dict
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import RewardInfo
from rtdmd.seeding import seed_for
from rtdmd.stats import N_BOOT

PROMPTS, PER_PROMPT = 10, 2
CATEGORIES = ["x"] * 4 + ["y"] * 6  # unequal strata: a stratified mean differs from the plain one


@REWARDS.register("test_claim_set_mean")
class SetMean:
    """A resamplable set metric: the mean grey level of a set (rows: each image's mean)."""

    info = RewardInfo(version="1", higher_is_better=True, differentiable=False, aggregate="set")

    def set_features(self, images, prompts, meta):
        return (images.mean(dim=(1, 2, 3))[:, None],)

    @staticmethod
    def set_value(rows):
        return rows.mean()

    def __call__(self, images, prompts, meta):
        return self.set_value(*self.set_features(images, prompts, meta))


def write_run(root, method: str, scores: np.ndarray, metric: str, grey: np.ndarray | None = None) -> dict:
    """A run directory of PROMPTS x PER_PROMPT images (seed 0) with ``scores[i, k]`` for ``metric``
    (and images of grey level ``grey[i, k]``), and its summary."""
    run = root / method / "s"
    (run / "images").mkdir(parents=True)
    manifest, rows = [], []
    for i in range(PROMPTS):
        for k in range(PER_PROMPT):
            sha = f"{method}-{i}-{k}"
            row = {
                "prompt_id": f"p{i:02d}",
                "seed": 0,
                "sample_index": k,
                "sha256": sha,
                "prompt": f"prompt {i}",
                "category": CATEGORIES[i],
                "file": f"images/{i}_{k}.png",
                "suite": "s",
                "metadata": "{}",
            }
            level = 0 if grey is None else int(grey[i, k])
            Image.fromarray(np.full((4, 4, 3), level, dtype=np.uint8)).save(run / row["file"])
            manifest.append(row)
            version = REWARDS.get(metric).info.version
            rows.append(
                {
                    "sha256": sha,
                    "prompt": row["prompt"],
                    "metric": metric,
                    "version": version,
                    "score": float(scores[i, k]),
                }
            )
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text(
        yaml.safe_dump({"prompts": PROMPTS, "images_per_prompt": PER_PROMPT, "seeds": [0]})
    )
    per_prompt = scores.mean(axis=1)
    cats = np.array(CATEGORIES)
    per_category = {c: float(per_prompt[cats == c].mean()) for c in ("x", "y")}
    value = (
        float(np.mean(list(per_category.values())))
        if REWARDS.get(metric).info.aggregate == "category_mean"
        else float(per_prompt.mean())
    )
    if grey is not None:
        value = float((grey / 255).mean())
    return {
        "method": {"name": method},
        "suite": {"name": "s"},
        "run_dir": str(run),
        "metrics": {metric: {"value": value, "per_category": per_category}},
    }


def card(*claims: dict) -> ClaimCard:
    return from_dict(ClaimCard, {"name": "t", "description": "d", "suites": ["s"], "claims": list(claims)})


def one_sided(observed: float, draws: np.ndarray) -> float:
    return (np.sum(draws - observed >= observed) + 1) / (len(draws) + 1)


def holm2(p: list[float]) -> list[float]:
    order = np.argsort(p)
    first = min(1.0, 2 * p[order[0]])
    adjusted = [0.0, 0.0]
    adjusted[order[0]], adjusted[order[1]] = first, max(first, min(1.0, p[order[1]]))
    return adjusted


def test_paired_prompt_claims_with_factors_offsets_and_both_directions(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.4, 1.0, (PROMPTS, PER_PROMPT)), rng.uniform(0.2, 0.8, (PROMPTS, PER_PROMPT))
    summaries = [write_run(tmp_path, "a", a, "brightness"), write_run(tmp_path, "b", b, "brightness")]
    above = {"text": "a above", "left": {"method": "a", "metric": "brightness", "offset": 0.01}, "op": ">",
             "right": {"method": "b", "metric": "brightness", "factor": 0.9, "offset": 0.05}}  # fmt: skip
    below = {"text": "a below", "left": {"method": "a", "metric": "brightness"}, "op": "<=",
             "right": {"method": "b", "metric": "brightness", "factor": 1.2}}  # fmt: skip
    claims = card(above, below)
    rows = significance(claims, check(claims, summaries), summaries)

    d_above = a.mean(1) - 0.9 * b.mean(1)
    d_below = a.mean(1) - 1.2 * b.mean(1)
    expected_p = []
    for row, d, shift, sign, text in [
        (rows[0], d_above, 0.01 - 0.05, 1, "a above"),
        (rows[1], d_below, 0.0, -1, "a below"),
    ]:
        draws = d[np.random.default_rng(seed_for("claim", "t", text)).integers(0, PROMPTS, (N_BOOT, PROMPTS))].mean(1)
        observed = d.mean() + shift
        assert row["diff"] == pytest.approx(observed, abs=1e-12)
        assert row["diff"] == pytest.approx(row["left"] - row["right"], abs=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.quantile(draws + shift, [0.025, 0.975])))
        expected_p.append(one_sided(sign * observed, sign * (draws + shift)))
        assert row["p_value"] == pytest.approx(expected_p[-1])
    assert rows[0]["held"] and rows[0]["p_value"] < 0.01 and not rows[1]["held"] and rows[1]["p_value"] > 0.5
    assert [r["p_holm"] for r in rows] == pytest.approx(holm2(expected_p))
    assert rows[0]["significant"] and not rows[1]["significant"]
    text = "\n".join(claims_section(claims, rows))
    assert "held, significant" in text and "1 of 2 claims held, 1 of them significantly" in text


def test_category_means_resample_within_categories_and_a_category_alone(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.uniform(0.0, 1.0, (PROMPTS, PER_PROMPT))
    summaries = [write_run(tmp_path, "a", a, "toy-geneval")]
    overall = {
        "text": "overall",
        "left": {"method": "a", "metric": "toy-geneval"},
        "op": ">=",
        "right": {"value": 0.45},
    }
    task = {"text": "task y", "left": {"method": "a", "metric": "toy-geneval", "category": "y"}, "op": ">=",
            "right": {"value": 0.45}}  # fmt: skip
    claims = card(overall, task)
    rows = significance(claims, check(claims, summaries), summaries)

    v = a.mean(1)
    groups = [np.arange(4), np.arange(4, 10)]
    draw = np.random.default_rng(seed_for("claim", "t", "overall"))
    stratified = np.mean([v[g][draw.integers(0, len(g), (N_BOOT, len(g)))].mean(1) for g in groups], axis=0) - 0.45
    observed = np.mean([v[g].mean() for g in groups]) - 0.45
    assert rows[0]["diff"] == pytest.approx(observed, abs=1e-12)
    assert rows[0]["p_value"] == pytest.approx(one_sided(observed, stratified))
    y = v[4:]
    draws = y[np.random.default_rng(seed_for("claim", "t", "task y")).integers(0, 6, (N_BOOT, 6))].mean(1) - 0.45
    assert rows[1]["diff"] == pytest.approx(y.mean() - 0.45, abs=1e-12)
    assert rows[1]["p_value"] == pytest.approx(one_sided(y.mean() - 0.45, draws))


def test_set_metrics_are_resampled_through_their_rows_on_the_same_prompts(tmp_path):
    rng = np.random.default_rng(2)
    grey_a = rng.integers(60, 200, (PROMPTS, PER_PROMPT))
    grey_b = rng.integers(40, 170, (PROMPTS, PER_PROMPT))
    zeros = np.zeros((PROMPTS, PER_PROMPT))
    summaries = [
        write_run(tmp_path, "a", zeros, "test_claim_set_mean", grey_a),
        write_run(tmp_path, "b", zeros, "test_claim_set_mean", grey_b),
    ]
    claim = {"text": "a lower", "left": {"method": "a", "metric": "test_claim_set_mean"}, "op": "<",
             "right": {"method": "b", "metric": "test_claim_set_mean", "factor": 1.5}}  # fmt: skip
    claims = card(claim)
    (row,) = significance(claims, check(claims, summaries), summaries)

    a, b = (grey_a / 255).mean(1), (grey_b / 255).mean(1)  # equal images per prompt: the set mean is the prompt mean
    draw = np.random.default_rng(seed_for("claim", "t", "a lower"))
    draws = np.array(
        [a[i].mean() - 1.5 * b[i].mean() for i in (draw.integers(0, PROMPTS, PROMPTS) for _ in range(SET_BOOT))]
    )
    observed = a.mean() - 1.5 * b.mean()
    assert row["diff"] == pytest.approx(observed, abs=1e-6)  # images load as float32
    assert row["p_value"] == pytest.approx(one_sided(-observed, -draws))
    assert row["held"] and row["significant"]


def test_runs_on_other_prompts_are_not_paired(tmp_path):
    a = np.full((PROMPTS, PER_PROMPT), 0.5)
    summaries = [write_run(tmp_path, "a", a, "brightness"), write_run(tmp_path, "b", a, "brightness")]
    manifest = tmp_path / "b" / "s" / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace('"p09"', '"q09"'))
    claims = card({"text": "c", "left": {"method": "a", "metric": "brightness"}, "op": ">=",
                   "right": {"method": "b", "metric": "brightness"}})  # fmt: skip
    with pytest.raises(ClaimError, match="different prompts"):
        significance(claims, check(claims, summaries), summaries)
    assert torch.is_tensor(SetMean().set_value(torch.ones(3, 1)))
