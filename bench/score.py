"""Harness stage ``score``: manifest -> ``scores.jsonl`` + ``set_scores.json``, by metric name from the reward registry.

Per-image metrics: a score is cached under (image sha256, prompt, metric, metric version):
rescoring after a new metric, or after regenerating a few images, computes only what is new.
Images are scored in batches; under ``torchrun`` the work is dealt to the ranks and merged by rank 0.

Set metrics (``info.aggregate == "set"``, e.g. a Fréchet distance) score all images of one run seed
at once; rank 0 computes them into ``set_scores.json``, a JSON list of rows ``{metric, version, seed,
value, n_images, key}`` where ``key`` is :func:`set_key`, the sha256 of that seed's (image sha256,
prompt) list: a set score is recomputed only when the images, their prompts or the version change.

A score that is not a finite number is refused when it is computed (naming the metric, the image and
the prompt), never cached: a NaN would otherwise rank as the best value of a leaderboard.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.runfiles import (
    MANIFEST,
    SCORE_PARTS,
    SCORES,
    SET_SCORES,
    cache_key,
    metadata_of,
    read_cache,
    read_manifest,
    read_set_scores,
)
from rtdmd import distributed, run_dir
from rtdmd.errors import RtdmdError, kill_point
from rtdmd.files import JsonLinesAppender, write_text_atomic
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import RewardInfo, require_metadata, score


class ScoreError(RtdmdError, ValueError):
    """Scoring cannot start: no manifest, an unknown metric, missing metadata."""


def check_metrics(metrics: list[str], manifest: list[dict], suite: str) -> dict[str, object]:
    """Instantiate the rewards; refuse a suite that lacks the metadata a metric needs."""
    require_metadata(metrics, [metadata_of(row) for row in manifest], f"suite {suite}", "images")
    return {name: REWARDS.get(name)() for name in metrics}


def cached_scores(root: Path) -> dict[tuple[str, str, str, str], dict]:
    """Every finite score row of ``scores.jsonl`` and the rank parts, by :func:`cache_key`'s tuple
    (a torn line or a non-finite score is not a cache entry: it is computed again)."""
    rows = {}
    for path in [root / SCORES, *sorted(root.glob(SCORE_PARTS))]:
        for r in read_cache(path):
            if isinstance(r.get("score"), (int, float)) and math.isfinite(r["score"]):
                rows[cache_key(r, r["metric"], r["version"])] = r
    return rows


def require_manifest(root: Path) -> list[dict]:
    manifest = read_manifest(root)
    if not manifest:
        raise ScoreError(f"{root / MANIFEST} is missing or empty: run `rtdmd-bench generate` first")
    return manifest


def refuse_non_finite(metric: str, rows: list[dict], values: list[float]) -> None:
    for row, value in zip(rows, values, strict=True):
        if not math.isfinite(value):
            raise ScoreError(
                f"metric {metric} gave {value} for image {row['file']} (prompt {row['prompt_id']}: {row['prompt']!r}); "
                "nothing was cached for it: a score must be a finite number"
            )


def is_set_metric(info: RewardInfo) -> bool:
    return info.aggregate == "set"


def set_key(manifest: list[dict]) -> str:
    """The identity of a run's image set: sha256 over its (image sha256, prompt) pairs in manifest order."""
    return hashlib.sha256(json.dumps([[r["sha256"], r["prompt"]] for r in manifest]).encode()).hexdigest()


def load_images(root: Path, rows: list[dict]) -> torch.Tensor:
    return torch.stack([read_image(root, r) for r in rows]).float() / 255


def read_image(root: Path, row: dict) -> torch.Tensor:
    """One image of the manifest as ``[3, H, W]`` uint8; a missing, truncated or corrupt file is a
    :class:`ScoreError` that names it (``generate`` and ``run`` replace such files)."""
    path = root / row["file"]
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
    except OSError as error:  # PIL's truncated and unidentified images are OSErrors too
        raise ScoreError(
            f"{path} is unreadable ({error}): rerun `rtdmd-bench generate` (or `run`) with the same arguments, "
            "which regenerates it, then score again"
        ) from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def score_stage(
    root: Path,
    metrics: list[str],
    batch_size: int = 16,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    root = Path(root)
    for name in metrics:  # a misspelt metric is named (with a did-you-mean) before anything is read
        REWARDS.get(name)
    manifest = require_manifest(root)
    # the process group first: a reward that places a network when built (GenEval's detector, "auto")
    # then takes this rank's GPU, not GPU 0 on every rank
    world = distributed.init(device)
    rewards = check_metrics(metrics, manifest, manifest[0]["suite"])
    set_rewards = {name: reward for name, reward in rewards.items() if is_set_metric(reward.info)}
    rewards = {name: reward for name, reward in rewards.items() if name not in set_rewards}
    with run_dir.exclusive(root, world.is_main):  # one writer per run folder
        cached = cached_scores(root)
        todo = [
            (name, row)
            for name, reward in rewards.items()
            for row in manifest
            if cache_key(row, name, reward.info.version) not in cached
        ]
        # every rank must read the cache before any rank appends to it: a rank that read a part file
        # another had started writing would deal itself a different share (a race seen under load)
        distributed.barrier()
        mine = todo[world.rank :: world.size]
        start_time, scoring_seconds = time.perf_counter(), 0.0  # the models are loaded: reading and scoring
        if mine:
            part = JsonLinesAppender(root / f"scores.part{world.rank}.jsonl")
            for start in range(0, len(mine), batch_size):
                if progress:
                    progress(start, len(mine))
                batch = mine[start : start + batch_size]
                for name in dict.fromkeys(n for n, _ in batch):
                    rows = [row for n, row in batch if n == name]
                    values = score(
                        rewards[name],
                        load_images(root, rows).to(world.device),
                        [r["prompt"] for r in rows],
                        [metadata_of(r) for r in rows],
                        batch_size=batch_size,
                    )
                    values = values.tolist()
                    refuse_non_finite(name, rows, values)
                    part.append(
                        score_row(row, name, rewards[name].info, value) for row, value in zip(rows, values, strict=True)
                    )
                kill_point("score-batch")
            part.close()
            scoring_seconds = time.perf_counter() - start_time
            if progress:
                progress(len(mine), len(mine))
        # the slowest rank's time; a collective, so also the barrier before rank 0 merges
        scoring_seconds = float(distributed.max_across(torch.tensor(scoring_seconds)))
        set_scored = 0
        if world.is_main:
            merged = cached_scores(root)
            keep = [
                score_row(row, name, reward.info, merged[cache_key(row, name, reward.info.version)]["score"])
                for row in manifest
                for name, reward in rewards.items()
            ]
            order = {(row["sha256"], row["prompt"]): i for i, row in enumerate(manifest)}
            # scores of other metrics for the current images stay cached, in a canonical order
            others = sorted(
                (r for k, r in merged.items() if k[2] not in rewards and k[:2] in order),
                key=lambda r: (order[(r["sha256"], r["prompt"])], r["metric"]),
            )
            write_text_atomic(root / SCORES, "".join(json.dumps(r) + "\n" for r in keep + others))
            for part_file in root.glob(SCORE_PARTS):
                part_file.unlink()
            set_scored = score_sets(root, manifest, set_rewards, world.device, batch_size)
        distributed.barrier()
        return {
            "run_dir": str(root),
            "scored": len(todo),
            "scoring_seconds": scoring_seconds,
            "cached": len(manifest) * len(rewards) - len(todo),
            "set_scored": set_scored,
            "set_cached": len(set_rewards) * len(seed_sets(manifest)) - set_scored if world.is_main else 0,
        }


def seed_sets(manifest: list[dict]) -> dict[int, list[dict]]:
    """The manifest's rows of each run seed (a set metric scores one seed's images at once)."""
    sets: dict[int, list[dict]] = {}
    for row in manifest:
        sets.setdefault(row["seed"], []).append(row)
    return sets


def score_sets(root: Path, manifest: list[dict], set_rewards: dict[str, object], device, batch_size: int) -> int:
    """Compute the set metrics whose (version, seed's image set) has no row in ``set_scores.json``;
    returns how many (metric, seed) values were computed.

    Rows of other metrics for the same image sets stay; rows of an older image set are dropped."""
    previous = read_set_scores(root)
    sets = seed_sets(manifest)
    keys = {seed: set_key(members) for seed, members in sets.items()}
    rows = {(r["metric"], r["seed"]): r for r in previous if "seed" in r and keys.get(r["seed"]) == r["key"]}
    computed = 0
    for seed, members in sets.items():
        todo = [n for n, reward in set_rewards.items() if rows.get((n, seed), {}).get("version") != reward.info.version]
        if not todo:
            continue
        # the protocol takes the whole set in one call: the images are loaded once for all set metrics
        images = torch.cat([load_images(root, members[i : i + batch_size]) for i in range(0, len(members), batch_size)])
        prompts, meta = [r["prompt"] for r in members], [metadata_of(r) for r in members]
        for name in todo:
            with torch.no_grad():
                value = set_rewards[name](images.to(device), prompts, meta)
            if value.numel() != 1:
                raise ScoreError(f"set metric {name} returned {value.numel()} values, expected one")
            if not math.isfinite(float(value)):
                raise ScoreError(f"set metric {name} gave {float(value)} for the images of seed {seed} in {root}")
            rows[(name, seed)] = {
                "metric": name,
                "version": set_rewards[name].info.version,
                "seed": seed,
                "value": float(value),
                "n_images": len(members),
                "key": keys[seed],
            }
            computed += 1
    current = [rows[k] for k in sorted(rows)]
    if current != previous:
        write_text_atomic(root / SET_SCORES, json.dumps(current, indent=2, allow_nan=False) + "\n")
    return computed


def score_row(row: dict, metric: str, info: RewardInfo, value: float) -> dict:
    return {
        "prompt_id": row["prompt_id"],
        "seed": row["seed"],
        "sample_index": row["sample_index"],
        "prompt": row["prompt"],
        "sha256": row["sha256"],
        "metric": metric,
        "version": info.version,
        "score": value,
    }
