"""Significance of claims: is a claim's inequality supported by the run, beyond the chance of which
prompts were drawn?

A claim ``f_l * L + o_l  op  f_r * R + o_r`` (``R`` a method's value or absent for a constant) is
tested on the difference ``t = s * ((f_l * L + o_l) - (f_r * R + o_r))`` with ``s = +1`` for ``>``,
``>=`` and ``-1`` for ``<``, ``<=``, against the null ``t <= 0``: one-sided, so a claim is supported
only where it holds in the direction it states. Both sides are resampled together: the same prompts
for both methods (a paired bootstrap; both runs must hold the same prompts and seeds), within
categories when the metric averages categories, as the report's headline is resampled
(:mod:`rtdmd.stats`). A set metric is resampled through its per-image rows
(:class:`rtdmd.rewards.base.ResamplableSetMetric`): every draw recomputes both sides' values on the
drawn prompts' images (and ground truth), with fewer draws, as each costs a covariance and two
eigendecompositions. The p-values of a card's claims are adjusted together by Holm's method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.aggregate import metric_strata, prompt_values, read_run
from bench.claims import Claim, ClaimCard, ClaimError, Operand
from bench.runfiles import metadata_of
from bench.score import load_images, seed_sets
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import ResamplableSetMetric
from rtdmd.seeding import seed_for
from rtdmd.stats import N_BOOT, headline, holm, one_sided_p, percentile_interval, resampled_headlines

SET_BOOT = 1000  # draws of a set metric's bootstrap (each recomputes the metric twice)
ALPHA = 0.05


def direction(claim: Claim) -> float:
    return 1.0 if claim.op in (">", ">=") else -1.0


class Runs:
    """Each run directory's manifest and scores, and a set metric's per-image rows, computed once per
    report (a card compares one method's toy-fd in several claims)."""

    def __init__(self, summaries: list[dict]):
        self.by_method = {s["method"]["name"]: s for s in summaries}
        self._read: dict[str, tuple] = {}
        self.rows: dict[tuple[str, str], list] = {}

    def read(self, method: str) -> tuple[Path, list[dict], list[dict]]:
        root = Path(self.by_method[method]["run_dir"])
        if str(root) not in self._read:
            _, manifest, scores = read_run(root)
            self._read[str(root)] = (root, manifest, scores)
        return self._read[str(root)]


def prompt_side(operand: Operand, runs: Runs) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Prompt ids, per-prompt values and strata of one operand (one category's prompts, unstratified,
    where the operand names a category)."""
    root, manifest, scores = runs.read(operand.method)
    suite = manifest[0]["suite"]
    pv = prompt_values(root, manifest, scores, operand.metric)
    if not operand.category:
        return pv.ids, pv.values, metric_strata(operand.metric, pv, suite)
    keep = [i for i, c in enumerate(pv.categories) if c == operand.category]
    return [pv.ids[i] for i in keep], pv.values[keep], None


def paired(left: list[str], right: list[str], claim: Claim) -> None:
    if left != right:
        raise ClaimError(
            f"claim {claim.text!r}: the two runs hold different prompts; a paired test needs the same ones"
        )


def prompt_test(claim: Claim, runs: Runs, seed: int) -> dict:
    """The difference of the two sides over per-prompt values: ``headline(f_l a - f_r b) + o_l - o_r``
    (the headline is linear), resampled as the headline is."""
    ids, a, strata = prompt_side(claim.left, runs)
    b = np.zeros_like(a)
    margin = claim.right.value if claim.right.value is not None else claim.right.offset
    if claim.right.value is None:
        right_ids, b, _ = prompt_side(claim.right, runs)
        paired(ids, right_ids, claim)
    d = claim.left.factor * a - claim.right.factor * b
    shift = claim.left.offset - margin
    return finish(claim, headline(d, strata) + shift, resampled_headlines(d, strata, N_BOOT, seed) + shift)


def set_rows(operand: Operand, runs: Runs, reward) -> list[tuple[list[str], tuple[torch.Tensor, ...]]]:
    """Per run seed: the prompt id of each image and the reward's per-image rows, grouped by prompt."""
    key = (operand.method, operand.metric)
    if key not in runs.rows:
        runs.rows[key] = _set_rows(operand.method, runs, reward)
    return runs.rows[key]


def _set_rows(method: str, runs: Runs, reward) -> list[tuple[list[str], tuple[torch.Tensor, ...]]]:
    root, manifest, _ = runs.read(method)
    out = []
    for _, members in sorted(seed_sets(manifest).items()):
        members = sorted(members, key=lambda r: (r["prompt_id"], r["sample_index"]))
        images = torch.cat([load_images(root, members[i : i + 256]) for i in range(0, len(members), 256)])
        prompts, meta = [r["prompt"] for r in members], [metadata_of(r) for r in members]
        with torch.no_grad():
            rows = tuple(t.double().cpu() for t in reward.set_features(images, prompts, meta))
        out.append(([r["prompt_id"] for r in members], rows))
    return out


def set_value(reward, per_seed, prompts: np.ndarray | None) -> float:
    """The mean over run seeds of the metric on the images of ``prompts`` (indices into the sorted
    prompt ids, repeats allowed; None = all)."""
    values = []
    for ids, rows in per_seed:
        per_prompt = len(ids) // len(set(ids))
        grouped = [r.reshape(len(ids) // per_prompt, per_prompt, *r.shape[1:]) for r in rows]
        drawn = grouped if prompts is None else [g[torch.from_numpy(prompts)] for g in grouped]
        values.append(float(reward.set_value(*(g.reshape(-1, *g.shape[2:]) for g in drawn))))
    return float(np.mean(values))


def set_test(claim: Claim, runs: Runs, seed: int) -> dict:
    reward = REWARDS.get(claim.left.metric)()
    if not isinstance(reward, ResamplableSetMetric):
        return {"p_value": None, "note": f"set metric {claim.left.metric} cannot be resampled"}
    sides = [(claim.left, set_rows(claim.left, runs, reward))]
    ids = sides[0][1][0][0]  # the first run seed's prompt id per image (every seed holds the same prompts)
    if claim.right.value is None:
        sides.append((claim.right, set_rows(claim.right, runs, reward)))
        paired(ids, sides[1][1][0][0], claim)
    margin = claim.right.value if claim.right.value is not None else 0.0

    def difference(prompts: np.ndarray | None) -> float:
        values = [op.factor * set_value(reward, rows, prompts) + op.offset for op, rows in sides]
        return values[0] - (values[1] if len(values) > 1 else margin)

    n_prompts = len(set(ids))
    rng = np.random.default_rng(seed)
    draws = np.array([difference(rng.integers(0, n_prompts, n_prompts)) for _ in range(SET_BOOT)])
    return finish(claim, difference(None), draws)


def finish(claim: Claim, observed: float, draws: np.ndarray) -> dict:
    lo, hi = percentile_interval(draws)
    sign = direction(claim)
    return {"diff": observed, "ci_low": lo, "ci_high": hi, "p_value": one_sided_p(sign * observed, sign * draws)}


def significance(card: ClaimCard, rows: list[dict], summaries: list[dict]) -> list[dict]:
    """``rows`` (from :func:`bench.claims.check`) with each checkable claim's difference (left - right),
    its 95% interval, one-sided p-value, Holm-adjusted p-value over the card and ``significant``
    (adjusted p <= 0.05). A claim on two different metrics, or on missing runs, is not tested."""
    runs = Runs([s for s in summaries if s["suite"]["name"] in card.suites])
    tested = []
    for claim, row in zip(card.claims, rows, strict=True):
        same_metric = claim.right.value is not None or claim.right.metric == claim.left.metric
        if row["held"] is None or not same_metric:
            tested.append(row | {"p_value": None})
            continue
        seed = seed_for("claim", card.name, claim.text)
        aggregate = REWARDS.get(claim.left.metric).info.aggregate
        tested.append(row | (set_test if aggregate == "set" else prompt_test)(claim, runs, seed))
    indices = [i for i, r in enumerate(tested) if r["p_value"] is not None]
    for i, p in zip(indices, holm([tested[i]["p_value"] for i in indices]), strict=True):
        tested[i] |= {"p_holm": p, "significant": p <= ALPHA}
    return tested
