"""Statistics over prompts: bootstrap confidence intervals and paired comparisons (pure numpy).

The unit of resampling is the prompt: a prompt's images share its difficulty, so resampling images
would understate the uncertainty. Every function takes an explicit seed: summaries are reproducible.
"""

from __future__ import annotations

import numpy as np


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of ``values`` resampled with replacement (``values``: one number per prompt)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(axis=1)


def bootstrap_ci(values: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    means = bootstrap_means(np.asarray(values, dtype=np.float64), n_boot, seed)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_difference(
    a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of ``a - b`` over paired prompts, its percentile bootstrap interval, and a two-sided
    p-value for "no difference" from the shifted bootstrap: ``P(|m* - d| >= |d|)`` with ``m*`` the
    resampled means, counted as ``(hits + 1) / (n_boot + 1)``."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    observed = float(diff.mean())
    means = bootstrap_means(diff, n_boot, seed)
    alpha = (1 - level) / 2
    hits = int(np.sum(np.abs(means - observed) >= abs(observed)))
    return {
        "diff": observed,
        "ci_low": float(np.quantile(means, alpha)),
        "ci_high": float(np.quantile(means, 1 - alpha)),
        "p_value": (hits + 1) / (n_boot + 1),
        "n_prompts": len(diff),
    }
