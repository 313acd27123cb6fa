"""Inputs shared by the mmdet-environment tests: synthetic PNGs (numpy only, so the default suite can
import this file without mmdet)."""

from __future__ import annotations

import numpy as np
import pytest

from rtdmd.geneval.client import write_png

SHAPES = ((96, 128), (128, 96))  # (H, W): one landscape, one portrait image (both padded after resizing)


def synthetic(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A colour gradient with two flat rectangles, uint8 RGB (distinct R and B, so BGR != RGB)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    px = np.stack([255 * x / w, 255 * y / h, 128 + 0 * x], axis=-1).astype(np.uint8)
    for _ in range(2):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        px[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    return px


@pytest.fixture(scope="session")
def make_image():
    return synthetic


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[np.ndarray, str]]:
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, shape in enumerate(SHAPES):
        px = synthetic(shape, i)
        write_png(px, folder / f"{i}.png")  # the same PNG encoding the client uses
        out.append((px, str(folder / f"{i}.png")))
    return out
