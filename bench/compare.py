"""``rtdmd-bench compare A B``: paired differences between two run folders made at any time, in any ``--out``.

The runs must hold the same images by coordinate (prompt id, run seed, sample index) of the same suite
version; unmatched sets are refused, not intersected, because a difference over a silently smaller set
is a different statistic. Per metric both runs were scored on: ``headline(A - B)`` over prompts with the
same bootstrap interval and p-value the leaderboard's paired column uses (the same resampling seed, so
``compare`` of a method against the reference folder gives the leaderboard's numbers), adjusted by Holm
over the metrics compared.
"""

from __future__ import annotations

from pathlib import Path

from bench.aggregate import metric_strata, paired_entry, prompt_values, read_run
from bench.runfiles import REPAIR_MANIFEST, row_key, same_noise
from rtdmd.errors import RtdmdError
from rtdmd.rewards import REWARDS
from rtdmd.stats import headline, holm


class CompareError(RtdmdError, ValueError):
    """Two runs that cannot be paired."""


def coordinates(manifest: list[dict]) -> set[tuple[str, int, int]]:
    return {row_key(r) for r in manifest}


def matched(a: Path, b: Path, manifest_a: list[dict], manifest_b: list[dict]) -> list[str]:
    """Check that the two manifests hold the same images of the same suite; returns notes."""
    if not manifest_a or not manifest_b:
        empty = a if not manifest_a else b
        raise CompareError(f"{empty} has no manifest: {REPAIR_MANIFEST}")
    suite_a = (manifest_a[0]["suite"], manifest_a[0]["suite_version"], manifest_a[0]["suite_sha256"])
    suite_b = (manifest_b[0]["suite"], manifest_b[0]["suite_version"], manifest_b[0]["suite_sha256"])
    if suite_a != suite_b:
        raise CompareError(
            f"{a} ran suite {suite_a[0]} v{suite_a[1]}, {b} suite {suite_b[0]} v{suite_b[1]}: not pairable"
        )
    ours, theirs = coordinates(manifest_a), coordinates(manifest_b)
    if ours != theirs:
        raise CompareError(
            f"the runs hold different images: {len(ours - theirs)} only in {a}, {len(theirs - ours)} only in {b}, "
            f"{len(ours & theirs)} in both; unmatched sets are refused: grow the smaller run with the larger one's "
            "--limit, --seeds and --images-per-prompt (it reuses what it has)"
        )
    if not same_noise(manifest_a, manifest_b):
        return ["the runs drew different initial noise for the same coordinates: pairs share prompts, not noise"]
    return []


def compare_runs(a: Path, b: Path, metrics: list[str] | None = None) -> dict:
    """Paired differences A - B per metric (:mod:`rtdmd.stats`); a plain dict for ``--json``."""
    a, b = Path(a), Path(b)
    _, manifest_a, scores_a = read_run(a)
    _, manifest_b, scores_b = read_run(b)
    notes = matched(a, b, manifest_a, manifest_b)
    suite = manifest_a[0]["suite"]
    shared = sorted({r["metric"] for r in scores_a} & {r["metric"] for r in scores_b})
    names = metrics or shared
    if missing := [m for m in names if m not in shared]:
        raise CompareError(f"metric(s) {', '.join(missing)} not scored in both runs (both have: {', '.join(shared)})")
    if not names:
        raise CompareError(f"{a} and {b} share no scored metric: run `rtdmd-bench score` on both")
    rows = {}
    for metric in names:
        pv_a, pv_b = prompt_values(a, manifest_a, scores_a, metric), prompt_values(b, manifest_b, scores_b, metric)
        entry = paired_entry(str(b), metric, pv_a, pv_b, suite)
        strata = metric_strata(metric, pv_a, suite)
        rows[metric] = {
            "a": headline(pv_a.values, strata),
            "b": headline(pv_b.values, strata),
            "higher_is_better": REWARDS.get(metric).info.higher_is_better,
            **{k: v for k, v in entry.items() if k != "reference"},
        }
    adjusted = holm([rows[m]["p_value"] for m in names])
    for metric, p in zip(names, adjusted, strict=True):
        rows[metric]["p_holm"] = p
    return {
        "a": str(a),
        "b": str(b),
        "suite": suite,
        "images": len(manifest_a),
        "prompts": len({r["prompt_id"] for r in manifest_a}),
        "metrics": rows,
        "notes": notes,
    }
