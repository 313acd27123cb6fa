"""Statistics of a leaderboard (pure numpy): the headline of per-prompt values, its bootstrap
interval, paired comparisons, and Holm's correction for the number of comparisons in a report.

The unit of resampling is the prompt: the images of one prompt (all its seeds and samples) share
the prompt's difficulty, so they are resampled together, as one prompt mean. Image noise is drawn
per (seed, prompt, image), with nothing shared across prompts by a seed, so the seeds are nested in
the prompts and the prompt means already carry their variation; resampling seeds as well would
count that noise twice.

A headline that averages per-category means (GenEval's overall score) is resampled within each
category (a stratified bootstrap): the interval and the paired test then describe the number that
is shown, not the plain mean over prompts. Every function takes an explicit seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOT = 10_000


def strata_of(categories: Sequence[str] | None) -> np.ndarray | None:
    """Integer stratum per prompt (categories in sorted order), or None for a plain mean."""
    if categories is None:
        return None
    return np.unique(np.asarray(categories, dtype=str), return_inverse=True)[1]


def _groups(n: int, strata: np.ndarray | None) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    return [np.flatnonzero(strata == c) for c in range(int(strata.max()) + 1)]


def headline(values: np.ndarray, strata: np.ndarray | None = None) -> float:
    """The reported statistic of per-prompt values ``v``: ``mean_i v_i``, or with strata (categories
    ``c`` of ``n_c`` prompts) the mean of the category means ``(1/C) sum_c (1/n_c) sum_{i in c} v_i``."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean([values[g].mean() for g in _groups(len(values), strata)]))


def resampled_headlines(values: np.ndarray, strata: np.ndarray | None, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` headlines of prompts drawn with replacement: ``n_c`` draws among the ``n_c`` prompts
    of each stratum (all ``n`` prompts at once without strata), then :func:`headline`'s average."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = [
        values[g][rng.integers(0, len(g), size=(n_boot, len(g)))].mean(axis=1) for g in _groups(len(values), strata)
    ]
    return np.mean(means, axis=0)


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def bootstrap_ci(
    values: np.ndarray, strata: np.ndarray | None = None, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`headline` (stratified when ``strata`` is given)."""
    return percentile_interval(resampled_headlines(values, strata, n_boot, seed), level)


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    strata: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """``d = headline(a - b)`` over paired prompts (equal to ``headline(a) - headline(b)``: the
    headline is linear), its percentile bootstrap interval, and a two-sided p-value for "no
    difference" from the shifted bootstrap: ``(#{|d* - d| >= |d|} + 1) / (n_boot + 1)`` with ``d*``
    the resampled differences. No resample reaching ``|d|`` gives the floor ``1 / (n_boot + 1)``
    (``p_floor``): the p-value is then below it, not equal to it."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    observed = headline(diff, strata)
    draws = resampled_headlines(diff, strata, n_boot, seed)
    hits = int(np.sum(np.abs(draws - observed) >= abs(observed)))
    lo, hi = percentile_interval(draws, level)
    return {
        "diff": observed,
        "ci_low": lo,
        "ci_high": hi,
        "p_value": (hits + 1) / (n_boot + 1),
        "p_floor": 1 / (n_boot + 1),
        "n_prompts": len(diff),
    }


def one_sided_p(observed: float, draws: np.ndarray) -> float:
    """p-value for "the statistic is above 0" from the shifted bootstrap: the resampled statistics
    ``t*`` centred on the observed ``t`` stand for its null distribution, so
    ``p = (#{t* - t >= t} + 1) / (n_boot + 1)``; ``t <= 0`` gives p >= about 1/2."""
    draws = np.asarray(draws, dtype=np.float64)
    return (int(np.sum(draws - observed >= observed)) + 1) / (len(draws) + 1)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment for ``m`` tests (family-wise error rate): with the p-values sorted
    ``p_(1) <= ... <= p_(m)``, ``p_adj_(k) = max_{j <= k} min(1, (m - j + 1) p_(j))``; returned in the
    input order. Reject at level alpha where ``p_adj <= alpha``."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for j, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - j) * p_values[i]))
        adjusted[i] = running
    return adjusted
