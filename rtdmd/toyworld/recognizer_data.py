"""The recogniser's training data and calibration: generated scenes, segmented by the toy detector's
own :func:`rtdmd.toyworld.detector.candidates`, each component labelled with the class of the object
whose mask it matches (IoU >= ``MATCH_IOU``), else ``reject``; the temperature fitted on held-out
logits. Used by ``rtdmd-train pretrain-recognizer``.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rtdmd.seeding import seed_for
from rtdmd.toyworld import degrade
from rtdmd.toyworld.detector import candidates
from rtdmd.toyworld.prompts import COLORS, _fits
from rtdmd.toyworld.recognizer import CROP, MATCH_IOU, REJECT, crop
from rtdmd.toyworld.world import SHAPES, SIZE, Obj, silhouette


def _place(rng: np.random.Generator, count: int) -> list:
    """``count`` non-overlapping objects of random class, colour and size 12-36 px."""
    objects: list = []
    for _ in range(200):
        if len(objects) == count:
            break
        size = float(rng.uniform(12, 36 if count == 1 else 28))
        cx, cy = rng.uniform(size / 2 + 1, SIZE - size / 2 - 1, size=2)
        obj = Obj(
            SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))], float(cx), float(cy), size
        )
        if _fits(obj, objects, gap=3.0):
            objects.append(obj)
    return objects


def training_sample(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops ``[n, CROP, CROP]`` and labels ``[n]`` (indices into :data:`CLASSES`) of every component
    of one generated scene: ``seed_for(seed, "recognizer", index)`` draws it all."""
    rng = np.random.default_rng(seed_for(seed, "recognizer", index))
    objects = _place(rng, int(rng.integers(1, 4)))
    covers = [silhouette(o) if rng.uniform() < 0.5 else degrade.varied(o, rng) for o in objects]
    bad = int(rng.integers(len(objects))) if rng.uniform() < 0.4 else -1
    if bad >= 0:
        kinds = list(degrade.MALFORMATIONS)
        covers[bad] = degrade.malformed(objects[bad], kinds[int(rng.integers(len(kinds)))], rng)
    image = degrade.degrade(degrade.paint(covers, [o.color for o in objects]), rng)
    crops, labels = [], []
    for found in candidates(image):
        label = REJECT
        for i, (obj, cover) in enumerate(zip(objects, covers, strict=True)):
            truth = cover >= 0.5
            iou = (found.mask & truth).sum() / max((found.mask | truth).sum(), 1)
            if i != bad and iou >= MATCH_IOU:
                label = SHAPES.index(obj.shape)
        crops.append(crop(found.alpha, found.box))
        labels.append(label)
    return np.asarray(crops, dtype=np.float32).reshape(-1, CROP, CROP), np.asarray(labels, dtype=np.int64)


def _samples(seed: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [training_sample(seed, i) for i in range(start, stop)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def training_set(seed: int, start: int, count: int, workers: int = 1) -> tuple[Tensor, Tensor]:
    """Crops ``[N, 1, CROP, CROP]`` and labels of scenes ``start .. start+count-1`` (any worker count
    gives the same tensors)."""
    if workers <= 1:
        crops, labels = _samples(seed, start, start + count)
    else:
        bounds = np.linspace(start, start + count, 8 * workers + 1).astype(int)
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_samples, [seed] * (len(bounds) - 1), bounds[:-1], bounds[1:]))
        crops, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return torch.from_numpy(crops).unsqueeze(1), torch.from_numpy(labels)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """``argmin_T NLL(softmax(logits / T), labels)`` over ``log T`` in [-3, 3] (golden-section search)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = -3.0, 3.0
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return math.exp((lo + hi) / 2)
