"""bench/perf/pg_variance.py's resampling: a resample's spread from the Gram matrix equals the spread
of the resampled gradients themselves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("pg_variance", Path(__file__).parents[1] / "bench/perf/pg_variance.py")
pg_variance = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(pg_variance)


def direct(grads: np.ndarray) -> tuple[float, float]:
    mean = grads.mean(0)
    return float(((grads - mean) ** 2).sum() / (len(grads) - 1)), float((mean**2).sum())


def test_resampled_spread_equals_the_spread_of_the_resampled_gradients():
    rng = np.random.default_rng(0)
    grads = rng.normal(0.3, 1.0, (12, 7))
    var, mean_sq = pg_variance.resampled_spread(grads @ grads.T, 5, seed=3)
    idx = np.random.default_rng(3).integers(0, 12, size=(5, 12))
    for b in range(5):
        assert (var[b], mean_sq[b]) == pytest.approx(direct(grads[idx[b]]))


def test_compare_gives_the_ratio_and_an_interval_around_it(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for arm, scale in (("rtdmd", 1.0), ("grpo-all-steps", 2.0)):
        grads = rng.normal(0.5, scale, (40, 5))
        var, mean_sq = direct(grads)
        record = {
            "arm": arm,
            "epochs": 40,
            "all": {"var": var, "rel_var": var / mean_sq},
            "gram": (grads @ grads.T).tolist(),
        }
        paths.append(tmp_path / f"{arm}.json")
        paths[-1].write_text(json.dumps(record))
    out = pg_variance.compare([str(p) for p in paths], n_boot=500)
    records = [json.loads(p.read_text()) for p in paths]
    assert out["var_ratio"]["value"] == pytest.approx(records[0]["all"]["var"] / records[1]["all"]["var"])
    lo, hi = out["var_ratio"]["ci95"]
    assert lo < out["var_ratio"]["value"] < hi and hi < 0.5  # a quarter of the variance, told apart from 1
    assert out["rel_var_ratio"]["ci95"][0] < out["rel_var_ratio"]["value"] < out["rel_var_ratio"]["ci95"][1]
