"""In-training evaluation on the harness's prompt suites, with the harness's seeds and statistics.

A training config names suites (a packaged card such as ``geneval`` or ``toy-geneval-quick``, a
prompt file, or ``hub:owner/name``) and their metrics::

    eval:
      every: 50
      suites:
        - {suite: drawbench, metrics: [clipscore, pickscore, hpsv21, imagereward, aesthetic]}
        - {suite: geneval}            # the card's default metrics: [geneval]

Every ``every`` steps the EMA generator samples each suite's prompts with the keys and run seed that
``rtdmd-bench run --seeds <eval.seed>`` uses (``"<suite>/<prompt_id>"``, sample index ``k``), so for
the same weights the images are the harness's; they are rounded to uint8 as a PNG would be, scored
with the harness's metadata, averaged per prompt, and reduced to the harness's headline
(:func:`rtdmd.stats.headline`: the mean over prompts, or for GenEval-style ``category_mean`` metrics
the mean of the category means). Logged as ``eval/<suite>/<metric>`` and, for ``category_mean``
metrics, ``eval/<suite>/<metric>/<category>``.

Suites and their scorers are loaded when the run starts: a missing file, an unknown metric, metadata
a metric needs, missing weights or a missing GenEval detector environment stop the run there, before
any training step. Set metrics (Fréchet distances) are refused: a
distance over a few hundred images is for ``rtdmd-bench``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtdmd.files import save_image_atomic
from rtdmd.images import grid, to_uint8
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import require_metadata, require_per_image, score
from rtdmd.sampling import generate
from rtdmd.stats import headline, strata_of
from rtdmd.suites import load_suite


@dataclass(frozen=True)
class EvalSuiteSpec:
    """One suite of the periodic evaluation. ``metrics`` empty = the card's default metrics."""

    suite: str
    metrics: tuple[str, ...] = ()
    num_prompts: int = 0  # the first N prompts of the suite (0 = all)
    images_per_prompt: int = 0  # 0 = the card's

    def validate(self) -> None:
        if self.num_prompts < 0 or self.images_per_prompt < 0:
            raise ValueError(f"eval suite {self.suite}: num_prompts and images_per_prompt must be >= 0")
        require_per_image(self.metrics, f"eval suite {self.suite}")


@dataclass(frozen=True)
class EvalSpec:
    """In-training evaluation with the EMA generator every ``every`` steps (0 = off)."""

    every: int = 0
    suites: tuple[EvalSuiteSpec, ...] = ()
    seed: int = 0  # the harness run seed whose images this evaluation reproduces
    prompts_dir: str = ""  # a directory of upstream prompt files ("" = the download cache, then the URL)
    compute_batch: int = 4

    def validate(self) -> None:
        if self.every < 0 or self.compute_batch < 1 or self.seed < 0:
            raise ValueError("eval.every and eval.seed must be >= 0, eval.compute_batch >= 1")
        if self.every and not self.suites:
            raise ValueError("eval.every > 0 needs eval.suites (e.g. [{suite: toy-geneval-quick}])")


@dataclass(frozen=True)
class EvalTask:
    """A loaded suite: its rows (``prompt_id, prompt, category, metadata``) and what to score."""

    name: str
    rows: list[dict]
    scorers: dict  # metric name -> its Reward, built when the run starts
    images_per_prompt: int

    @property
    def meta(self) -> list[dict]:
        return [json.loads(row["metadata"]) for row in self.rows]


def load_tasks(spec: EvalSpec) -> list[EvalTask]:
    """Every suite of ``spec`` loaded, its metrics resolved and checked against its metadata."""
    tasks = []
    for entry in spec.suites:
        suite = load_suite(entry.suite, spec.prompts_dir or None, images_per_prompt=entry.images_per_prompt)
        rows = suite.rows[: entry.num_prompts or None]
        metrics = entry.metrics or suite.card.default_metrics
        require_per_image(metrics, f"eval suite {entry.suite} (its card's default metrics)")
        require_metadata(metrics, [json.loads(row["metadata"]) for row in rows], f"eval suite {entry.suite}")
        # built now, so that missing weights or a missing detector environment stop the run before training
        scorers = {name: REWARDS.get(name)() for name in metrics}
        tasks.append(EvalTask(suite.card.name, rows, scorers, suite.card.images_per_prompt))
    return tasks


def headline_logs(task: EvalTask, metric: str, values: np.ndarray) -> dict[str, float]:
    """Per-image ``values`` (prompt-major, ``images_per_prompt`` each) -> the harness's headline and,
    for ``category_mean`` metrics, each category's mean over its prompts."""
    per_prompt = values.reshape(len(task.rows), task.images_per_prompt).mean(axis=1)
    categories = [row["category"] for row in task.rows]
    stratified = REWARDS.get(metric).info.aggregate == "category_mean"
    key = f"eval/{task.name}/{metric}"
    logs = {key: headline(per_prompt, strata_of(categories) if stratified else None)}
    if stratified:
        by_category = defaultdict(list)
        for category, value in zip(categories, per_prompt, strict=True):
            by_category[category].append(value)
        logs |= {f"{key}/{c}": float(np.mean(v)) for c, v in sorted(by_category.items())}
    return logs


def evaluate(sess, step: int) -> dict[str, float]:
    """The EMA generator on every eval suite (see the module docstring); a grid per suite under ``eval/``."""

    spec, cfg = sess.cfg.eval, sess.cfg
    logs: dict[str, float] = {}
    for task in sess.eval_tasks:
        n = task.images_per_prompt
        prompts = [row["prompt"] for row in task.rows for _ in range(n)]
        keys = [(f"{task.name}/{row['prompt_id']}", k) for row in task.rows for k in range(n)]
        with (
            sess.ema.swapped_in(sess.gen_params),
            torch.autocast(sess.world.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"),
        ):
            images = generate(
                sess.models.backbone,
                sess.generator,
                prompts,
                keys,
                cfg.sampler,
                run_seed=spec.seed,
                height=cfg.height,
                width=cfg.width,
                compute_batch=spec.compute_batch,
            )
        pixels = to_uint8(images)  # what the harness scores: the PNG's bytes
        rounded = pixels.permute(0, 3, 1, 2).float().div(255)
        meta = [m for m in task.meta for _ in range(n)]
        for metric, scorer in task.scorers.items():
            values = score(scorer, rounded, prompts, meta).double().numpy()
            logs |= headline_logs(task, metric, values)
        if sess.world.is_main:
            folder = Path(sess.root) / "eval" / task.name
            folder.mkdir(parents=True, exist_ok=True)
            save_image_atomic(grid(list(pixels[::n][:64].cpu()), 8), folder / f"step_{step:08d}.png")
    return logs
