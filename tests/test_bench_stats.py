"""The leaderboard's statistics: stratified bootstrap of the reported value, paired differences,
Holm's correction, and how run seeds enter (rtdmd/stats.py, bench/aggregate.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.aggregate import metric_summary, paired_entry, prompt_values
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import RewardInfo
from rtdmd.seeding import seed_for
from rtdmd.stats import N_BOOT, bootstrap_ci, headline, holm, paired_difference, resampled_headlines, strata_of


@REWARDS.register("test_category_score")
class CategoryScore:
    info = RewardInfo(version="1", higher_is_better=True, differentiable=False, aggregate="category_mean")

    def __call__(self, images, prompts, meta):  # only the info is used here
        raise NotImplementedError


def test_stratified_resampling_of_a_hand_computed_case():
    """Category a holds prompts scored 0 and 1, category b one prompt scored 5. The reported value is
    (0.5 + 5) / 2 = 2.75. Resampling within categories, b stays 5 and a's mean is 0, 0.5 or 1 with
    probabilities 1/4, 1/2, 1/4: the resampled values are 2.5, 2.75, 3.0 with those probabilities, and the
    95% interval is [2.5, 3.0]. Resampling prompts across categories would give other values (b drawn
    twice, or not at all)."""
    values, strata = np.array([0.0, 1.0, 5.0]), strata_of(["a", "a", "b"])
    assert headline(values, strata) == 2.75 and headline(values) == 2.0
    draws = resampled_headlines(values, strata, 20_000, seed=0)
    support, counts = np.unique(draws, return_counts=True)
    assert support.tolist() == [2.5, 2.75, 3.0]
    np.testing.assert_allclose(counts / len(draws), [0.25, 0.5, 0.25], atol=0.015)
    assert bootstrap_ci(values, strata, 20_000, seed=0) == (2.5, 3.0)
    plain = resampled_headlines(values, None, 20_000, seed=0)  # the plain mean: draws over all three prompts
    assert {0.0, 5.0} <= set(np.unique(plain).tolist())  # e.g. b never drawn, or drawn three times


def test_the_stratified_interval_is_of_the_category_mean_not_the_prompt_mean():
    """What was wrong before: a category mean shown with the interval of the prompt mean, which need
    not contain it (toy RTDMD 0.1278 [0.0323, 0.1210])."""
    rng = np.random.default_rng(0)
    categories = ["single"] * 4 + ["many"] * 40
    values = np.concatenate([np.ones(4), (rng.random(40) < 0.05).astype(float)])
    strata = strata_of(categories)
    value = headline(values, strata)
    lo, hi = bootstrap_ci(values, strata, seed=1)
    plain_lo, plain_hi = bootstrap_ci(values, None, seed=1)
    assert lo <= value <= hi
    assert not plain_lo <= value <= plain_hi  # the old interval misses the value it was printed beside


def test_paired_difference_is_the_difference_of_the_headlines_with_a_stratified_test():
    rng = np.random.default_rng(2)
    strata = strata_of(["x"] * 5 + ["y"] * 20 + ["z"] * 3)
    a, b = rng.random(28), rng.random(28)
    d = paired_difference(a, b, strata, n_boot=4000, seed=3)
    assert d["diff"] == pytest.approx(headline(a, strata) - headline(b, strata), abs=1e-12)
    assert d["ci_low"] <= d["diff"] <= d["ci_high"] and d["p_floor"] == 1 / 4001
    same = paired_difference(a, a + 0.5, strata, n_boot=4000, seed=3)  # a constant shift: every resample agrees
    assert same["diff"] == pytest.approx(-0.5) and same["p_value"] == same["p_floor"]
    hand = (np.abs(resampled_headlines(a - b, strata, 4000, 3) - d["diff"]) >= abs(d["diff"])).sum()
    assert d["p_value"] == (hand + 1) / 4001


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    data=st.lists(
        st.tuples(st.sampled_from("abcd"), st.floats(-1e3, 1e3, allow_nan=False), st.floats(-1e3, 1e3)),
        min_size=1,
        max_size=30,
    ),
    stratified=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_value_lies_in_its_interval_and_paired_differences_are_differences(data, stratified, seed):
    categories, a, b = (list(x) for x in zip(*data, strict=True))
    a, b = np.array(a), np.array(b)
    strata = strata_of(categories) if stratified else None
    for values in (a, b):
        lo, hi = bootstrap_ci(values, strata, n_boot=500, seed=seed)
        assert lo <= headline(values, strata) <= hi
    d = paired_difference(a, b, strata, n_boot=500, seed=seed)
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    scale = max(1.0, np.abs(a).max(), np.abs(b).max())
    assert abs(d["diff"] - (headline(a, strata) - headline(b, strata))) <= 1e-12 * scale
    assert d["p_floor"] <= d["p_value"] <= 1


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> the running max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == [] and holm([0.2]) == [0.2]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=40))
def test_holm_is_monotone_bounded_and_at_least_the_raw_p(p):
    adjusted = holm(p)
    assert all(raw <= adj <= 1 for raw, adj in zip(p, adjusted, strict=True))
    order = np.argsort(p, kind="stable")
    assert all(adjusted[i] <= adjusted[j] for i, j in itertools.pairwise(order))
    assert min(adjusted) == pytest.approx(min(1.0, len(p) * min(p)))  # the smallest: Bonferroni's


# ---------------------------------------------------------------- run seeds


def synthetic_run(values: np.ndarray, categories: list[str], metric: str) -> tuple[list[dict], list[dict]]:
    """Manifest and score rows of a run with ``values[prompt, seed, image]``."""
    manifest, scores = [], []
    for (p, s, k), v in np.ndenumerate(values):
        sha = f"{p}-{s}-{k}"
        row = {"prompt_id": f"{p:05d}", "seed": s, "sample_index": k, "sha256": sha, "prompt": f"prompt {p}"}
        manifest.append(row | {"category": categories[p], "file": f"{sha}.png"})
        scores.append(row | {"metric": metric, "version": "1", "score": float(v)})
    return manifest, scores


def test_several_seeds_give_the_mean_of_the_seed_values_and_a_prompt_resampled_interval(tmp_path):
    """Image noise is drawn per (seed, prompt, image): scores x[p, s] = e[p, s], e ~ N(0, 1), no prompt
    effect. The standard error of the value over P prompts and S seeds is 1 / sqrt(P S); an interval of
    one seed's images would be sqrt(S) times wider, one that also resampled seeds sqrt(2) times wider."""
    prompts, seeds = 1000, 4
    x = np.random.default_rng(0).standard_normal((prompts, seeds, 1))
    manifest, scores = synthetic_run(x, ["c"] * prompts, "brightness")
    pv = prompt_values(tmp_path, manifest, scores, "brightness")
    entry = metric_summary("brightness", pv, "suite")
    assert entry["n_seeds"] == seeds and list(entry["per_seed"]) == ["0", "1", "2", "3"]
    np.testing.assert_allclose(list(entry["per_seed"].values()), x[:, :, 0].mean(axis=0), atol=1e-12)
    assert entry["value"] == pytest.approx(np.mean(list(entry["per_seed"].values())), abs=1e-12)
    width = entry["ci95"][1] - entry["ci95"][0]
    expected = 2 * 1.96 / np.sqrt(prompts * seeds)
    assert abs(width / expected - 1) < 0.1, (width, expected)


def test_a_category_mean_with_seeds_is_stratified_and_paired_per_prompt(tmp_path):
    rng = np.random.default_rng(1)
    categories = ["a"] * 3 + ["b"] * 12
    ours, theirs = rng.random((15, 2, 2)), rng.random((15, 2, 2))
    pv = prompt_values(tmp_path, *synthetic_run(ours, categories, "test_category_score"), "test_category_score")
    ref = prompt_values(tmp_path, *synthetic_run(theirs, categories, "test_category_score"), "test_category_score")
    entry = metric_summary("test_category_score", pv, "suite")
    by_category = [ours[:3].mean(), ours[3:].mean()]
    assert entry["value"] == pytest.approx(np.mean(by_category), abs=1e-12) and entry["resampled"] == (
        "prompts within categories"
    )
    assert entry["prompt_mean"] == pytest.approx(ours.mean(), abs=1e-12)
    for s in (0, 1):
        assert entry["per_seed"][str(s)] == pytest.approx(np.mean([ours[:3, s].mean(), ours[3:, s].mean()]))
    assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    seed = seed_for("bootstrap", "suite", "test_category_score")
    assert entry["ci95"] == list(bootstrap_ci(ours.mean(axis=(1, 2)), strata_of(categories), N_BOOT, seed))
    paired = paired_entry("ref", "test_category_score", pv, ref, "suite")
    ref_entry = metric_summary("test_category_score", ref, "suite")
    assert paired["diff"] == pytest.approx(entry["value"] - ref_entry["value"], abs=1e-12)
