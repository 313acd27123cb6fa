"""Harness stage ``aggregate``: manifest + scores -> ``summary.json``.

Per metric: the mean over prompts (each prompt's images averaged first) with a 95% bootstrap
interval over prompts, per-category means, and, against a reference method run on the same suite,
prompts and seeds, the paired difference with its interval and p-value. ``category_mean`` metrics
(GenEval's task-averaged score) also report ``image_mean``, the plain mean over prompts. Set
metrics (``set_scores.json``) have one value per run: no interval (``ci95`` null, with a note), and
the comparison with the reference is the plain difference of values. The summary holds only what
the inputs determine (no clock times), so reruns write identical bytes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.generate import MANIFEST, read_jsonl
from bench.methods import MethodCard
from bench.score import SCORES, read_set_scores, set_key
from bench.stats import bootstrap_ci, paired_difference
from rtdmd import run_dir
from rtdmd.checkpoint import write_text_atomic
from rtdmd.config import from_dict, to_dict
from rtdmd.rewards import REWARDS
from rtdmd.seeding import seed_for

SUMMARY = "summary.json"
N_BOOT = 10_000
SET_NOTE = "set metric: no per-prompt bootstrap"


class AggregateError(ValueError):
    pass


def per_prompt(manifest: list[dict], scores: list[dict], metric: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Prompt ids (manifest order), the mean score of each prompt's images, and their categories."""
    by_image = {(r["prompt_id"], r["sample_index"]): r["score"] for r in scores if r["metric"] == metric}
    values: dict[str, list[float]] = defaultdict(list)
    category: dict[str, str] = {}
    for row in manifest:
        key = (row["prompt_id"], row["sample_index"])
        if key not in by_image:
            raise AggregateError(f"no {metric} score for image {key}: run `rtdmd-bench score` first")
        values[row["prompt_id"]].append(by_image[key])
        category[row["prompt_id"]] = row["category"]
    ids = list(values)
    return ids, np.array([np.mean(values[i]) for i in ids]), [category[i] for i in ids]


def provenance() -> dict:
    """The code that produced a summary: rtdmd's commit (not the run's clock, so reruns match) and libraries."""
    git = run_dir.git_state()
    return {
        "rtdmd_git": git["sha"] or "unknown",
        "rtdmd_commit_date": git["date"] or "unknown",
        "packages": {p: run_dir.package_version(p) for p in ("torch", "diffusers", "transformers")},
    }


def metric_summary(metric: str, ids: list[str], values: np.ndarray, categories: list[str], suite: str) -> dict:
    info = REWARDS.get(metric).info
    order = list(dict.fromkeys(c for c in categories if c))  # the suite's order (GenEval's task order)
    per_category = {
        c: float(np.mean([v for v, cc in zip(values, categories, strict=True) if cc == c]))
        for c in sorted(set(categories))
        if c
    }
    if info.aggregate == "category_mean":
        if not per_category:
            raise AggregateError(f"metric {metric} averages over categories, but suite {suite} has none")
        value = float(np.mean(list(per_category.values())))
    else:
        value = float(values.mean())
    lo, hi = bootstrap_ci(values, N_BOOT, seed_for("bootstrap", suite, metric))
    entry = {
        "version": info.version,
        "higher_is_better": info.higher_is_better,
        "units": info.units,
        "aggregate": info.aggregate,
        "value": value,
        "ci95": [lo, hi],
        "n_prompts": len(ids),
        "per_category": per_category,
    }
    if info.aggregate == "category_mean":
        entry |= {"image_mean": float(values.mean()), "categories": order}
    return entry


def current_set_scores(root: Path, manifest: list[dict]) -> dict[str, dict]:
    """Set-metric rows of ``root`` computed on the manifest's current images; a stale row is an error."""
    key, rows = set_key(manifest), read_set_scores(root)
    stale = sorted(r["metric"] for r in rows if r["key"] != key)
    if stale:
        raise AggregateError(
            f"{root}: set metric(s) {', '.join(stale)} were scored on other images: run `rtdmd-bench score` again"
        )
    return {r["metric"]: r for r in rows}


def set_summary(metric: str, row: dict, n_prompts: int) -> dict:
    info = REWARDS.get(metric).info
    if row["version"] != info.version:
        raise AggregateError(f"set metric {metric} was scored at version {row['version']}, now {info.version}: rescore")
    return {
        "version": info.version,
        "higher_is_better": info.higher_is_better,
        "units": info.units,
        "aggregate": info.aggregate,
        "value": row["value"],
        "ci95": None,
        "note": SET_NOTE,
        "n_prompts": n_prompts,
        "n_images": row["n_images"],
        "per_category": {},
    }


def set_difference(reference: str, row: dict, ref_row: dict) -> dict:
    """One value per run on each side: the difference, without an interval or p-value."""
    if row["version"] != ref_row["version"]:
        raise AggregateError(f"set metric {row['metric']}: reference {reference} was scored at another version")
    return {
        "reference": reference,
        "diff": row["value"] - ref_row["value"],
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "n_images": row["n_images"],
        "note": SET_NOTE,
    }


def aggregate_stage(root: Path, reference: str = "") -> dict:
    root = Path(root)
    manifest, scores = read_jsonl(root / MANIFEST), read_jsonl(root / SCORES)
    set_rows = current_set_scores(root, manifest) if manifest else {}
    if not manifest or not (scores or set_rows):
        raise AggregateError(f"{root} has no manifest or no scores: run `rtdmd-bench generate` and `score` first")
    import yaml

    config = yaml.safe_load((root / "config.yaml").read_text())
    method = from_dict(MethodCard, config["method"])
    suite = manifest[0]["suite"]
    metrics = sorted({r["metric"] for r in scores})
    ref_root = root.parent.parent / reference / suite if reference else None
    if ref_root is not None:
        ref_manifest = read_jsonl(ref_root / MANIFEST)
        if not ref_manifest:
            raise AggregateError(f"reference {reference}: no run for suite {suite} under {ref_root.parent.parent}")
        ours = {(r["prompt_id"], r["sample_index"]): r["init_seed"] for r in manifest}
        theirs = {(r["prompt_id"], r["sample_index"]): r["init_seed"] for r in ref_manifest}
        if ours != theirs:
            raise AggregateError(f"reference {reference} was not run on the same prompts and seeds")
        ref_scores = read_jsonl(ref_root / SCORES)
        ref_set_rows = current_set_scores(ref_root, ref_manifest)
    summary_metrics = {}
    for metric in metrics:
        ids, values, categories = per_prompt(manifest, scores, metric)
        entry = metric_summary(metric, ids, values, categories, suite)
        if ref_root is not None and any(r["metric"] == metric for r in ref_scores):
            ref_ids, ref_values, _ = per_prompt(ref_manifest, ref_scores, metric)
            ref_by_id = dict(zip(ref_ids, ref_values, strict=True))
            entry["vs_reference"] = {
                "reference": reference,
                **paired_difference(
                    values, np.array([ref_by_id[i] for i in ids]), N_BOOT, seed_for("paired", suite, metric)
                ),
            }
        summary_metrics[metric] = entry
    n_prompts = len({r["prompt_id"] for r in manifest})
    for metric, row in sorted(set_rows.items()):
        entry = set_summary(metric, row, n_prompts)
        if ref_root is not None and metric in ref_set_rows:
            entry["vs_reference"] = set_difference(reference, row, ref_set_rows[metric])
        summary_metrics[metric] = entry
    nfe = sorted({r["nfe"] for r in manifest})
    summary = {
        "method": {
            "name": method.name,
            "display": method.display or method.name,
            "fingerprint": method.fingerprint(),
            "licence": method.licence,
            "trained_on": list(method.trained_on),
            "published": [to_dict(p) for p in method.published if p.suite == suite],
            "sampler": to_dict(method.sampler),
            "resolution": [method.height, method.width],
        },
        "suite": {
            "name": suite,
            "version": manifest[0]["suite_version"],
            "sha256": manifest[0]["suite_sha256"],
            "prompts": n_prompts,
            "images_per_prompt": max(r["sample_index"] for r in manifest) + 1,
        },
        "seed": manifest[0]["seed"],
        "images": len(manifest),
        "nfe": nfe[0] if len(nfe) == 1 else nfe,
        "metrics": summary_metrics,
        "run_dir": str(root),
        "provenance": provenance(),
    }
    write_text_atomic(root / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
