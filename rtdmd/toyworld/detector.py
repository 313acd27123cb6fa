"""An exact detector for the toy world: segmentation, colour and shape classification.

* foreground: pixels farther than ``FOREGROUND`` (RGB distance) from the grey background;
* objects: 4-connected foreground components of at least ``MIN_AREA`` pixels;
* colour: the palette colour nearest to the component's median RGB (edge pixels blend with grey,
  the median ignores them);
* coverage: each pixel near the component is read as ``alpha`` in [0, 1] by projecting
  ``pixel - background`` onto ``colour - background`` (the renderer averages colour and background
  by coverage, so a clean render gives back its exact anti-aliased coverage);
* shape: each class's silhouette (fractional coverage from the renderer) is fitted to ``alpha``
  (centre and size from the bounding box, then coordinate search) by soft IoU
  ``sum min(a, t) / sum max(a, t)``; the best class wins and its soft IoU is the detection score:
  ~1 for clean renders, low for malformed blobs.
"""

from collections import deque

import numpy as np

from rtdmd.rewards.geneval import Detection
from rtdmd.toyworld.world import BACKGROUND, PALETTE, SHAPES, SIZE, Obj, silhouette

FOREGROUND = 40.0
MIN_AREA = 8
_PALETTE = np.array(list(PALETTE.values()), dtype=np.float64)
_NAMES = list(PALETTE)


def components(foreground: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 4-connected components of ``foreground`` (row-major discovery order)."""
    h, w = foreground.shape
    labels = np.zeros((h, w), dtype=np.int32)
    masks = []
    for y0, x0 in zip(*np.nonzero(foreground), strict=True):
        if labels[y0, x0]:
            continue
        label = len(masks) + 1
        labels[y0, x0] = label
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and foreground[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        ys, xs = zip(*pixels, strict=True)
        mask = np.zeros((h, w), dtype=bool)
        mask[list(ys), list(xs)] = True
        masks.append(mask)
    return masks


def _extent(shape: str) -> tuple[float, float, float, float]:
    """The shape's mask extent relative to its centre, in units of its size: (x_lo, x_hi, y_lo, y_hi)."""
    cover = silhouette(Obj(shape, "red", 32.0, 32.0, 48.0)) >= 0.5
    ys, xs = np.nonzero(cover)
    return ((xs.min() - 32) / 48, (xs.max() + 1 - 32) / 48, (ys.min() - 32) / 48, (ys.max() + 1 - 32) / 48)


_EXTENTS = {shape: _extent(shape) for shape in SHAPES}


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """``sum min(a, b) / sum max(a, b)`` of two coverage maps in [0, 1]."""
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union else 0.0


def _grow(m: np.ndarray) -> np.ndarray:
    """The mask and its 4-neighbours (to include the anti-aliased fringe below the threshold)."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def coverage(pixels: np.ndarray, region: np.ndarray, rgb: tuple[float, ...]) -> np.ndarray:
    """Per-pixel coverage of colour ``rgb`` over the background, zero outside ``region``."""
    bg = np.array(BACKGROUND, dtype=np.float64)
    direction = np.asarray(rgb, dtype=np.float64) - bg
    alpha = ((pixels - bg) @ direction) / max(float(direction @ direction), 1e-6)
    return np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)


AXIS_MOVES = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 2), (0, 0, -2)]
ALL_MOVES = [(dx, dy, ds) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for ds in (-2, 0, 2) if (dx, dy, ds) != (0, 0, 0)]


def fit_shape(
    shape: str, alpha: np.ndarray, box: tuple[int, int, int, int], moves: list = AXIS_MOVES, start: Obj | None = None
) -> tuple[float, Obj]:
    """Soft IoU of ``shape``'s silhouette against the coverage map ``alpha``: placed from the bounding
    box (or ``start``), then improved by local search over centre and size with ``moves`` (steps 1
    to 1/8 px; no moves: the placement only)."""
    x1, y1, x2, y2 = box
    xl, xh, yl, yh = _EXTENTS[shape]
    size = max((x2 - x1) / (xh - xl), (y2 - y1) / (yh - yl))
    cx, cy = x1 - xl * size + (x2 - x1 - (xh - xl) * size) / 2, y1 - yl * size + (y2 - y1 - (yh - yl) * size) / 2
    pad = 3
    wx0, wy0 = max(x1 - pad, 0), max(y1 - pad, 0)
    window = (wx0, wy0, min(x2 + pad, SIZE) - wx0, min(y2 + pad, SIZE) - wy0)
    target = alpha[wy0 : wy0 + window[3], wx0 : wx0 + window[2]]

    def score(obj: Obj) -> float:
        return soft_iou(silhouette(obj, window=window), target)

    best_obj = start or Obj(shape, "red", cx, cy, size)
    best = score(best_obj)
    for step in (1.0, 0.5, 0.25, 0.125) if moves else ():
        improved = True
        while improved:
            improved = False
            for dx, dy, ds in moves:
                candidate = Obj(
                    shape, "red", best_obj.cx + dx * step, best_obj.cy + dy * step, best_obj.size + ds * step
                )
                if candidate.size < 1:  # a generated sliver can shrink the fit to nothing
                    continue
                value = score(candidate)
                if value > best + 1e-9:
                    best, best_obj, improved = value, candidate, True
    return best, best_obj


def detect(image: np.ndarray) -> list[Detection]:
    """Detections of a ``[H, W, 3]`` uint8 (or float in [0, 1]) toy image."""
    floating = np.issubdtype(np.asarray(image).dtype, np.floating)
    pixels = np.asarray(image, dtype=np.float64)
    if floating:  # float images are in [0, 1]; uint8 ones (even all-black) are already 0-255
        pixels = pixels * 255
    foreground = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float64), axis=-1) > FOREGROUND
    out = []
    for mask in components(foreground):
        if mask.sum() < MIN_AREA:
            continue
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        rgb = np.median(pixels[mask], axis=0)
        color = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]
        alpha = coverage(pixels, _grow(mask), PALETTE[color])
        # every class placed from the box; those within 0.15 of the best refined along the axes; the
        # winner polished over all neighbouring moves for its score
        coarse = [(fit_shape(s, alpha, box, moves=[])[0], s) for s in SHAPES]
        top = max(c for c, _ in coarse)
        (_, fitted), shape = max(
            ((fit_shape(s, alpha, box), s) for c, s in coarse if c >= top - 0.15), key=lambda f: f[0][0]
        )
        score, _ = fit_shape(shape, alpha, box, moves=ALL_MOVES, start=fitted)
        out.append(Detection(label=shape, box=box, score=score, mask=mask, color=color))
    return out
