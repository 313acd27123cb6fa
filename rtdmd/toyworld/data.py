"""Toy-world datasets: the fixed evaluation prompts, the training stream, parallel rendering.

* evaluation prompts (``eval_metadata``): GenEval's six tasks in GenEval's proportions, scaled to
  what the world admits (8 shapes give only 8 single-object and 24 counting prompts);
* training stream (``train_metadata``): example ``i`` draws a task uniformly and then a prompt, both
  from ``seed_for(seed, "train", i, attempt)``; prompts of the evaluation set are redrawn, so the
  training prompts are disjoint from the evaluation prompts (held-out compositions, as in GenEval);
* ``render_examples``: example ``i``'s scene comes from ``seed_for(seed, "scene", i)``: any slice of
  the stream renders the same on any number of worker processes.
"""

from __future__ import annotations

import functools
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from rtdmd.seeding import seed_for
from rtdmd.toyworld.prompts import TAGS, make_prompts, sample_metadata, scene_for
from rtdmd.toyworld.world import render

EVAL_SEED = 2026
# GenEval: 80 / 99 / 80 / 94 / 100 / 100 of 553; single_object and counting are capped by the world
EVAL_MIX = {"single_object": 4, "two_object": 24, "counting": 12, "colors": 24, "position": 30, "color_attr": 30}


@functools.cache
def eval_metadata() -> tuple[dict, ...]:
    """The ``toy-geneval`` prompts (GenEval metadata dicts, GenEval's task order)."""
    return tuple(make_prompts(EVAL_SEED, EVAL_MIX))


@functools.cache
def eval_prompts() -> frozenset[str]:
    return frozenset(m["prompt"] for m in eval_metadata())


def train_metadata(seed: int, index: int) -> dict:
    """Example ``index`` of the training stream (never an evaluation prompt)."""
    held_out = eval_prompts()
    for attempt in range(1000):
        rng = np.random.default_rng(seed_for(seed, "train", index, attempt))
        metadata = sample_metadata(TAGS[int(rng.integers(len(TAGS)))], rng)
        if metadata["prompt"] not in held_out:
            return metadata
    raise RuntimeError(f"training example {index}: every draw was an evaluation prompt")


def _render_range(seed: int, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
    images, prompts = [], []
    for index in range(start, stop):
        metadata = train_metadata(seed, index)
        images.append(render(scene_for(metadata, seed_for(seed, "scene", index))))
        prompts.append(metadata["prompt"])
    return np.stack(images), prompts


def render_examples(seed: int, start: int, count: int, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """Training examples ``start .. start+count-1``: uint8 images ``[count, 64, 64, 3]`` and prompts."""
    if workers <= 1 or count < 256:
        return _render_range(seed, start, start + count)
    bounds = np.linspace(start, start + count, 4 * workers + 1).astype(int)
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_render_range, [seed] * (len(bounds) - 1), bounds[:-1], bounds[1:]))
    return np.concatenate([p[0] for p in parts]), [p for part in parts for p in part[1]]
