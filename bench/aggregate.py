"""Harness stage ``aggregate``: manifest + scores -> ``summary.json``.

Per metric: the headline value (the mean over prompts of each prompt's mean score over all its
images and run seeds; for ``category_mean`` metrics such as GenEval's overall score, the mean of the
per-category means), a 95% bootstrap interval of that same statistic (prompts resampled, within
each category for category means: :mod:`rtdmd.stats`), the value each run seed alone gives, the
per-category means, and, against a reference method run on the same suite, prompts and seeds, the
paired difference with its interval and p-value. ``category_mean`` metrics also report
``prompt_mean``, the plain mean over prompts. Set metrics (``set_scores.json``) have one value per
run seed: the value is their mean, without an interval (``ci95`` null, with a note), and the
comparison with the reference is the plain difference of values.

Scores are used only at the metric's current version and only when finite; anything else stops
with the file and the command that repairs it. The summary holds only what the inputs determine
(no clock times), so reruns write identical bytes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from bench.methods import MethodCard
from bench.runfiles import (
    MANIFEST,
    REPAIR_MANIFEST,
    SCORES,
    SUMMARY,
    read_manifest,
    read_scores,
    read_set_scores,
    same_noise,
)
from bench.score import seed_sets, set_key
from rtdmd import run_dir
from rtdmd.config import from_dict, to_dict
from rtdmd.errors import RtdmdError, kill_point
from rtdmd.files import write_text_atomic
from rtdmd.rewards import REWARDS
from rtdmd.seeding import seed_for
from rtdmd.stats import N_BOOT, bootstrap_ci, headline, paired_difference, strata_of
from rtdmd.suites import card_names, load_card

SET_NOTE = "set metric: no per-prompt bootstrap"


class AggregateError(RtdmdError, ValueError):
    pass


@dataclass(frozen=True)
class PromptValues:
    """One metric's scores of a run, per prompt (manifest order): ``values[i]`` is prompt i's mean over
    all its images, ``per_seed[i, j]`` its mean over the images of run seed ``seeds[j]``."""

    ids: list[str]
    categories: list[str]
    seeds: list[int]
    values: np.ndarray
    per_seed: np.ndarray


def image_scores(root: Path, scores: list[dict], metric: str) -> dict[tuple[str, str], float]:
    """``{(image sha256, prompt): score}`` of ``metric`` at its current version; stale or non-finite rows stop."""
    version = REWARDS.get(metric).info.version
    rows = [r for r in scores if r["metric"] == metric]
    rescore = f"run `rtdmd-bench score {root} --metrics {metric}`"
    if stale := sorted({str(r["version"]) for r in rows if r["version"] != version}):
        raise AggregateError(
            f"{root / SCORES}: {metric} was scored at version {', '.join(stale)}, the metric is now version "
            f"{version}: {rescore} to rescore"
        )
    for r in rows:
        if not (isinstance(r["score"], (int, float)) and math.isfinite(r["score"])):
            raise AggregateError(
                f"{root / SCORES}: {metric} score of prompt {r['prompt_id']} is {r['score']}: {rescore} "
                "(a score that is not a finite number is computed again, or refused)"
            )
    return {(r["sha256"], r["prompt"]): r["score"] for r in rows}


def prompt_values(root: Path, manifest: list[dict], scores: list[dict], metric: str) -> PromptValues:
    by_image = image_scores(root, scores, metric)
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    category: dict[str, str] = {}
    for row in manifest:
        key = (row["sha256"], row["prompt"])
        if key not in by_image:
            raise AggregateError(f"no {metric} score for image {root / row['file']}: run `rtdmd-bench score` first")
        cells[(row["prompt_id"], row["seed"])].append(by_image[key])
        category[row["prompt_id"]] = row["category"]
    ids = list(category)
    seeds = sorted({seed for _, seed in cells})
    counts = {len(v) for v in cells.values()}
    if len(cells) != len(ids) * len(seeds) or len(counts) != 1:
        raise AggregateError(f"{root / MANIFEST}: prompts have unequal numbers of images per seed: {REPAIR_MANIFEST}")
    per_seed = np.array([[np.mean(cells[(i, s)]) for s in seeds] for i in ids], dtype=np.float64)
    return PromptValues(ids, [category[i] for i in ids], seeds, per_seed.mean(axis=1), per_seed)


def provenance(root: Path) -> dict:
    """The code that produced a summary (rtdmd's commit, with or without local changes, not the run's
    clock, so reruns match) and libraries, and the devices the run's images were generated on."""
    git = run_dir.git_state()
    env_file = root / "env.json"
    env = json.loads(env_file.read_text()) if env_file.exists() else {}
    devices = sorted({e["device"] for e in [env, *env.get("resumed", [])] if "device" in e})
    return {
        "rtdmd_git": git["sha"] or "unknown",
        "rtdmd_dirty": bool(git["dirty"]),
        "generated_on": devices,
        "rtdmd_commit_date": git["date"] or "unknown",
        "packages": {p: run_dir.package_version(p) for p in ("torch", "diffusers", "transformers")},
    }


def metric_strata(metric: str, pv: PromptValues, suite: str) -> np.ndarray | None:
    """The categories a ``category_mean`` metric averages over (and resamples within); None otherwise."""
    if REWARDS.get(metric).info.aggregate != "category_mean":
        return None
    if not any(pv.categories):
        raise AggregateError(f"metric {metric} averages over categories, but suite {suite} has none")
    if not all(pv.categories):
        raise AggregateError(f"metric {metric} averages over categories, but some prompts of suite {suite} have none")
    return strata_of(pv.categories)


def metric_summary(metric: str, pv: PromptValues, suite: str) -> dict:
    info = REWARDS.get(metric).info
    strata = metric_strata(metric, pv, suite)
    per_category = {
        c: float(np.mean([v for v, cc in zip(pv.values, pv.categories, strict=True) if cc == c]))
        for c in sorted(set(pv.categories))
        if c
    }
    lo, hi = bootstrap_ci(pv.values, strata, N_BOOT, seed_for("bootstrap", suite, metric))
    entry = {
        "version": info.version,
        "higher_is_better": info.higher_is_better,
        "units": info.units,
        "aggregate": info.aggregate,
        "value": headline(pv.values, strata),
        "ci95": [lo, hi],
        "resampled": "prompts within categories" if strata is not None else "prompts",
        "n_prompts": len(pv.ids),
        "n_seeds": len(pv.seeds),
        "per_seed": {str(s): headline(pv.per_seed[:, j], strata) for j, s in enumerate(pv.seeds)},
        "per_category": per_category,
    }
    if strata is not None:
        entry |= {"prompt_mean": float(pv.values.mean()), "categories": list(dict.fromkeys(pv.categories))}
    return entry


def paired_entry(reference: str, metric: str, pv: PromptValues, ref: PromptValues, suite: str) -> dict:
    """``headline(ours - reference)`` over the same prompts, resampled as the headline is."""
    ref_by_id = dict(zip(ref.ids, ref.values, strict=True))
    strata = metric_strata(metric, pv, suite)
    other = np.array([ref_by_id[i] for i in pv.ids])
    return {
        "reference": reference,
        **paired_difference(pv.values, other, strata, N_BOOT, seed_for("paired", suite, metric)),
    }


def current_set_scores(root: Path, manifest: list[dict]) -> dict[str, dict[int, dict]]:
    """Set-metric rows of ``root`` by metric and run seed, computed on the manifest's current images;
    a row of other images, or a seed without a row, is an error."""
    keys = {seed: set_key(rows) for seed, rows in seed_sets(manifest).items()}
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    stale = set()
    for row in read_set_scores(root):
        if keys.get(row.get("seed")) == row["key"]:
            found[row["metric"]][row["seed"]] = row
        else:
            stale.add(row["metric"])
    stale |= {m for m, by_seed in found.items() if set(by_seed) != set(keys)}
    if stale:
        raise AggregateError(
            f"{root}: set metric(s) {', '.join(sorted(stale))} were scored on other images: run `rtdmd-bench score` again"
        )
    return dict(found)


def set_summary(metric: str, by_seed: dict[int, dict], n_prompts: int) -> dict:
    info = REWARDS.get(metric).info
    if stale := sorted({r["version"] for r in by_seed.values() if r["version"] != info.version}):
        raise AggregateError(
            f"set metric {metric} was scored at version {', '.join(stale)}, now {info.version}: rescore"
        )
    if not all(math.isfinite(r["value"]) for r in by_seed.values()):
        raise AggregateError(f"set metric {metric} holds a value that is not finite: run `rtdmd-bench score` again")
    seeds = sorted(by_seed)
    return {
        "version": info.version,
        "higher_is_better": info.higher_is_better,
        "units": info.units,
        "aggregate": info.aggregate,
        "value": float(np.mean([by_seed[s]["value"] for s in seeds])),
        "ci95": None,
        "note": SET_NOTE,
        "n_prompts": n_prompts,
        "n_seeds": len(seeds),
        "n_images": sum(by_seed[s]["n_images"] for s in seeds),
        "per_seed": {str(s): by_seed[s]["value"] for s in seeds},
        "per_category": {},
    }


def set_difference(reference: str, entry: dict, ref_entry: dict) -> dict:
    """One value per run on each side (both at the metric's current version, :func:`set_summary`):
    the difference, without an interval or p-value."""
    return {
        "reference": reference,
        "diff": entry["value"] - ref_entry["value"],
        "ci_low": None,
        "ci_high": None,
        "p_value": None,
        "n_images": entry["n_images"],
        "note": SET_NOTE,
    }


def check_complete(root: Path, spec: dict, manifest: list[dict]) -> None:
    """The manifest holds every image the run's config (``spec``) asks for (a row lost without a
    trace would shrink the prompt set silently)."""
    if not {"prompts", "images_per_prompt", "seeds"} <= set(spec):
        raise AggregateError(
            f"{root} was generated by an older rtdmd (its config.yaml has no prompt count or seeds): generate it anew"
        )
    prompts, ipp, seeds = spec["prompts"], spec["images_per_prompt"], spec["seeds"]
    wanted = {(p, s, k) for p in range(prompts) for s in seeds for k in range(ipp)}
    position = {prompt_id: i for i, prompt_id in enumerate(dict.fromkeys(r["prompt_id"] for r in manifest))}
    found = {(position[r["prompt_id"]], r["seed"], r["sample_index"]) for r in manifest}
    if len(manifest) != len(wanted) or found != wanted:
        raise AggregateError(
            f"{root / MANIFEST} holds {len(manifest)} images, not {prompts} prompts x {len(seeds)} seed(s) x {ipp}: "
            f"{REPAIR_MANIFEST}"
        )


def read_run(root: Path) -> tuple[dict, list[dict], list[dict]]:
    """A run's ``config.yaml``, manifest and scores; a torn or incomplete file stops with the fix."""
    manifest = read_manifest(root)
    scores = read_scores(root)
    config = yaml.safe_load((root / "config.yaml").read_text()) if manifest else {}
    if manifest:
        check_complete(root, config, manifest)
    return config, manifest, scores


def metric_note(suite: str) -> dict:
    """``{"metric_note": ...}`` where the suite's card says its default metrics stand in for the benchmark's own."""
    note = load_card(suite).metric_note if suite in card_names() else ""
    return {"metric_note": note} if note else {}


def aggregate_stage(root: Path, reference: str = "") -> dict:
    root = Path(root)
    config, manifest, scores = read_run(root)
    set_rows = current_set_scores(root, manifest) if manifest else {}
    if not manifest or not (scores or set_rows):
        raise AggregateError(f"{root} has no manifest or no scores: run `rtdmd-bench generate` and `score` first")
    method = from_dict(MethodCard, config["method"])
    suite = manifest[0]["suite"]
    metrics = sorted({r["metric"] for r in scores})
    ref_root = root.parent.parent / reference / suite if reference else None
    if ref_root is not None:
        _, ref_manifest, ref_scores = read_run(ref_root)
        if not ref_manifest:
            raise AggregateError(f"reference {reference}: no run for suite {suite} under {ref_root.parent.parent}")
        if not same_noise(manifest, ref_manifest):
            raise AggregateError(
                f"reference {reference} was not run on the same prompts and seeds ({len(ref_manifest)} images, this run "
                f"{len(manifest)}): run both with the same --limit, --seeds and --images-per-prompt (a run folder grows)"
            )
        ref_set_rows = current_set_scores(ref_root, ref_manifest)
    summary_metrics = {}
    for metric in metrics:
        pv = prompt_values(root, manifest, scores, metric)
        entry = metric_summary(metric, pv, suite)
        if ref_root is not None and any(r["metric"] == metric for r in ref_scores):
            ref = prompt_values(ref_root, ref_manifest, ref_scores, metric)
            entry["vs_reference"] = paired_entry(reference, metric, pv, ref, suite)
        summary_metrics[metric] = entry
    n_prompts = len({r["prompt_id"] for r in manifest})
    for metric, by_seed in sorted(set_rows.items()):
        entry = set_summary(metric, by_seed, n_prompts)
        if ref_root is not None and metric in ref_set_rows:
            ref_entry = set_summary(metric, ref_set_rows[metric], n_prompts)
            entry["vs_reference"] = set_difference(reference, entry, ref_entry)
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
            **metric_note(suite),
        },
        "seeds": sorted({r["seed"] for r in manifest}),
        "images": len(manifest),
        "nfe": nfe[0] if len(nfe) == 1 else nfe,
        "metrics": summary_metrics,
        "run_dir": str(root),
        "provenance": provenance(root),
    }
    write_text_atomic(root / SUMMARY, json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    kill_point("aggregate-summary")
    return summary
