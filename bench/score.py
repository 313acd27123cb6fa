"""Harness stage ``score``: manifest -> ``scores.jsonl``, by metric name from the reward registry.

A score is cached under (image sha256, prompt, metric, metric version): rescoring after a new
metric, or after regenerating a few images, computes only what is new. Images are scored in
batches; under ``torchrun`` the work is dealt to the ranks and merged by rank 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.generate import MANIFEST, read_jsonl
from rtdmd import distributed
from rtdmd.checkpoint import write_text_atomic
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import RewardInfo, score

SCORES = "scores.jsonl"


class ScoreError(ValueError):
    """Scoring cannot start: no manifest, an unknown metric, missing metadata."""


def cache_key(row: dict, metric: str, info: RewardInfo) -> tuple[str, str, str, str]:
    return row["sha256"], row["prompt"], metric, info.version


def check_metrics(metrics: list[str], manifest: list[dict], suite: str) -> dict[str, object]:
    """Instantiate the rewards; refuse a suite that lacks the metadata a metric needs."""
    rewards = {}
    for name in metrics:
        cls = REWARDS.get(name)  # unknown names raise with a did-you-mean
        for key in cls.info.needs:
            lacking = sum(key not in json.loads(row["metadata"]) for row in manifest)
            if lacking:
                raise ScoreError(
                    f"metric {name} needs per-prompt metadata {key!r}, which suite {suite} lacks ({lacking} of {len(manifest)} images)"
                )
        rewards[name] = cls()
    return rewards


def load_images(root: Path, rows: list[dict]) -> torch.Tensor:
    return (
        torch.stack(
            [torch.from_numpy(np.array(Image.open(root / r["file"]).convert("RGB"))).permute(2, 0, 1) for r in rows]
        ).float()
        / 255
    )


def score_stage(
    root: Path,
    metrics: list[str],
    batch_size: int = 16,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    root = Path(root)
    manifest = read_jsonl(root / MANIFEST)
    if not manifest:
        raise ScoreError(f"{root / MANIFEST} is missing or empty: run `rtdmd-bench generate` first")
    rewards = check_metrics(metrics, manifest, manifest[0]["suite"])
    world = distributed.init(device)
    cached = {}
    for path in [root / SCORES, *sorted(root.glob("scores.part*.jsonl"))]:
        for r in read_jsonl(path):
            cached[(r["sha256"], r["prompt"], r["metric"], r["version"])] = r
    todo = [
        (name, row)
        for name, reward in rewards.items()
        for row in manifest
        if cache_key(row, name, reward.info) not in cached
    ]
    mine = todo[world.rank :: world.size]
    if mine:
        part = (root / f"scores.part{world.rank}.jsonl").open("a")
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
                    [json.loads(r["metadata"]) for r in rows],
                    batch_size=batch_size,
                )
                for row, value in zip(rows, values.tolist(), strict=True):
                    part.write(json.dumps(score_row(row, name, rewards[name].info, value)) + "\n")
            part.flush()
            os.fsync(part.fileno())
        part.close()
        if progress:
            progress(len(mine), len(mine))
    distributed.barrier()
    if world.is_main:
        merged = {}
        for path in [root / SCORES, *sorted(root.glob("scores.part*.jsonl"))]:
            for r in read_jsonl(path):
                merged[(r["sha256"], r["prompt"], r["metric"], r["version"])] = r
        keep = [merged[cache_key(row, name, reward.info)] for row in manifest for name, reward in rewards.items()]
        order = {(row["sha256"], row["prompt"]): i for i, row in enumerate(manifest)}
        # scores of other metrics for the current images stay cached, in a canonical order
        others = sorted(
            (r for k, r in merged.items() if k[2] not in rewards and k[:2] in order),
            key=lambda r: (order[(r["sha256"], r["prompt"])], r["metric"]),
        )
        write_text_atomic(root / SCORES, "".join(json.dumps(r) + "\n" for r in keep + others))
        for part_file in root.glob("scores.part*.jsonl"):
            part_file.unlink()
    distributed.barrier()
    return {"run_dir": str(root), "scored": len(todo), "cached": len(manifest) * len(rewards) - len(todo)}


def score_row(row: dict, metric: str, info: RewardInfo, value: float) -> dict:
    return {
        "prompt_id": row["prompt_id"],
        "sample_index": row["sample_index"],
        "prompt": row["prompt"],
        "sha256": row["sha256"],
        "metric": metric,
        "version": info.version,
        "score": value,
    }
