"""Toy-world datasets: the fixed evaluation prompts, the training stream, parallel rendering.

* evaluation prompts (``eval_metadata``): GenEval's six tasks; every single-object (8) and counting
  (24) prompt the world has, 12 two-object prompts (of 28 pairs) and 24 of each other compositional task;
* training stream (``train_metadata``): example ``i`` draws a task uniformly (``seed_for(seed, "train", i)``)
  and then a prompt of that task (``seed_for(seed, "train", i, attempt)``). As in GenEval, what is held out are compositions, not
  vocabulary: single objects and counts are trained on (any real model has seen "a photo of a
  dog"), while a two-object, colour, position or colour-attribute prompt whose
  :func:`~rtdmd.toyworld.prompts.composition` is an evaluation prompt's (in either wording) is
  redrawn, so those evaluation prompts are combinations the teacher never saw;
* ``render_examples``: example ``i``'s scene comes from ``seed_for(seed, "scene", i)``: any slice of
  the stream renders the same on any number of worker processes.
"""

from __future__ import annotations

import functools
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from rtdmd.seeding import seed_for
from rtdmd.toyworld.prompts import TAGS, composition, make_prompts, sample_metadata, scene_for
from rtdmd.toyworld.world import render

EVAL_SEED = 2026
# GenEval: 80 / 99 / 80 / 94 / 100 / 100 of 553; the world has 8 single-object and 24 counting prompts
EVAL_MIX = {"single_object": 8, "two_object": 12, "counting": 24, "colors": 24, "position": 24, "color_attr": 24}


@functools.cache
def eval_metadata() -> tuple[dict, ...]:
    """The ``toy-geneval`` prompts (GenEval metadata dicts, GenEval's task order)."""
    return tuple(make_prompts(EVAL_SEED, EVAL_MIX))


@functools.cache
def held_out() -> frozenset:
    """The compositions of the evaluation prompts (none for single objects and counts)."""
    return frozenset(key for m in eval_metadata() if (key := composition(m)) is not None)


def train_metadata(seed: int, index: int) -> dict:
    """Example ``index`` of the training stream (never a held-out composition)."""
    excluded = held_out()
    tag = TAGS[int(np.random.default_rng(seed_for(seed, "train", index)).integers(len(TAGS)))]
    for attempt in range(1000):  # redrawn within the task, so the task mix stays uniform
        metadata = sample_metadata(tag, np.random.default_rng(seed_for(seed, "train", index, attempt)))
        if composition(metadata) not in excluded:
            return metadata
    raise RuntimeError(f"training example {index}: every draw was a held-out composition")


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
