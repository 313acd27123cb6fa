"""Degraded and malformed toy images: what the recogniser of :mod:`rtdmd.toyworld.recognizer` is
trained on and what its acceptance tests judge it by.

* **mild degradations** a person reads easily, each with a strength in [0, 1]:
  ``TRAINING_DEGRADATIONS`` (blur, pixel noise, JPEG, a small affine warp, a colour shift) are drawn
  during training; ``HELD_OUT_DEGRADATIONS`` (sharpening, a 2x down-up resize, gamma, posterising,
  motion blur) never are, so the tests can check that confidence survives kinds it was not fitted to;
* **varied objects** (:func:`varied`): a valid object drawn with the proportions a generator gets
  slightly wrong (arm widths, hole sizes, aspect, a small rotation, uneven edges, rounded corners);
  they keep their class;
* **malformed objects** (``MALFORMATIONS``) a detector should not recognise: two classes fused, a
  shape with a large part cut away, a random blob, a shape squashed to an aspect ratio over 1.6, a
  shape cut into pieces, two shapes merged into one component.

Everything draws from a ``numpy`` generator, so a sample is a function of its seed.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rtdmd.toyworld.world import (
    BACKGROUND,
    PALETTE,
    SHAPES,
    SIZE,
    SUPERSAMPLE,
    Obj,
    _cross,
    _downsample,
    _draw,
    parts,
    silhouette,
)

# ---------------------------------------------------------------- mild degradations (strength in [0, 1])


def blur(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of radius up to 1 px."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1.0 * strength)))


def noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of std up to 10 levels (of 255)."""
    return np.clip(image + rng.normal(0, 10 * strength, image.shape), 0, 255).round().astype(np.uint8)


def jpeg(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG at quality 95 (strength 0) down to 60 (strength 1)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(round(95 - 35 * strength)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def warp(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """An affine warp about the centre: rotation up to 8 degrees, anisotropic scale up to 8%, shear up to 0.08."""
    angle = math.radians(8 * strength * rng.uniform(-1, 1))
    sx, sy = 1 + 0.08 * strength * rng.uniform(-1, 1, size=2)
    shear = 0.08 * strength * rng.uniform(-1, 1)
    a = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ np.array(
        [[sx, shear], [0, sy]]
    )
    inverse = np.linalg.inv(a)  # PIL maps output coordinates to input ones
    centre = np.array([SIZE / 2, SIZE / 2])
    offset = centre - inverse @ centre
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    warped = Image.fromarray(image).transform(
        image.shape[1::-1], Image.AFFINE, coefficients, resample=Image.BILINEAR, fillcolor=BACKGROUND
    )
    return np.asarray(warped)


def colour_shift(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Every channel offset by up to 15 levels and scaled by up to 6%."""
    offset = 15 * strength * rng.uniform(-1, 1, size=3)
    scale = 1 + 0.06 * strength * rng.uniform(-1, 1, size=3)
    return np.clip(image * scale + offset, 0, 255).round().astype(np.uint8)


def sharpen(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Unsharp masking (radius 1, up to 100%; stronger halos join neighbouring objects into one)."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.UnsharpMask(radius=1, percent=int(100 * strength))))


def down_up(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Bilinear resize to 64 / (1 + strength) px and back."""
    small = max(8, int(round(SIZE / (1 + strength))))
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((small, small), Image.BILINEAR).resize(pil.size, Image.BILINEAR))


def gamma(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma 1 +- 0.25."""
    g = 1 + 0.25 * strength * rng.choice([-1, 1])
    return np.clip(255 * (image / 255) ** g, 0, 255).round().astype(np.uint8)


def posterise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Each channel quantised to 2^(8 - 4 strength) levels."""
    bits = 8 - int(round(4 * strength))
    return np.asarray(Image.fromarray(image).quantize(2**bits).convert("RGB")) if bits < 8 else image


def motion_blur(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """The mean of the image shifted along one axis by up to +-1 px (a 3-tap motion blur)."""
    reach = int(round(strength))
    if not reach:
        return image
    axis = int(rng.integers(2))
    shifted = [np.roll(image.astype(np.float64), k, axis=axis) for k in range(-reach, reach + 1)]
    return np.clip(np.mean(shifted, axis=0), 0, 255).round().astype(np.uint8)


TRAINING_DEGRADATIONS = {"blur": blur, "noise": noise, "jpeg": jpeg, "warp": warp, "colour_shift": colour_shift}
HELD_OUT_DEGRADATIONS = {
    "sharpen": sharpen,
    "down_up": down_up,
    "gamma": gamma,
    "posterise": posterise,
    "motion_blur": motion_blur,
}


def degrade(image: np.ndarray, rng: np.random.Generator, kinds: dict = TRAINING_DEGRADATIONS, max_kinds: int = 3):
    """Up to ``max_kinds`` of ``kinds``, each at a random strength, in a random order."""
    names = list(kinds)
    chosen = rng.choice(len(names), size=int(rng.integers(0, max_kinds + 1)), replace=False)
    for index in chosen:
        image = kinds[names[index]](image, float(rng.uniform(0, 1)), rng)
    return image


# ---------------------------------------------------------------- varied objects


def _polygon(part, vertices: int = 48) -> np.ndarray:
    kind, geometry = part
    if kind == "polygon":
        return np.asarray(geometry, dtype=np.float64)
    x0, y0, x1, y1 = geometry
    angles = np.linspace(0, 2 * math.pi, vertices, endpoint=False)
    return np.stack([(x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(angles), (y0 + y1) / 2 + (y1 - y0) / 2 * np.sin(angles)], 1)


def varied(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """Coverage of ``obj`` with generator-like errors that keep its class: cross arms 0.24-0.44 of the
    half-size wide, holes scaled 0.8-1.2 and moved up to 0.08 of the size, aspect 0.87-1.15, rotation
    up to 10 degrees, vertices moved up to 3% of the size, corners rounded by up to 0.8 px."""
    k, h = SUPERSAMPLE, obj.size / 2
    filled, holes = parts(obj.shape, 0.0, 0.0, obj.size)
    if obj.shape == "cross":
        filled = [_cross(0.0, 0.0, h, h * rng.uniform(0.24, 0.44))]
    scale, shift = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08, size=2) * obj.size
    angle = math.radians(rng.uniform(-10, 10))
    aspect = math.exp(rng.uniform(-0.14, 0.14))
    linear = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) @ np.diag(
        [math.sqrt(aspect), 1 / math.sqrt(aspect)]
    )
    canvas, draw = _canvas()

    def place(points: np.ndarray) -> list[tuple[float, float]]:
        points = points + rng.uniform(-0.03, 0.03, size=points.shape) * obj.size
        out = points @ linear.T + (obj.cx, obj.cy)
        return [(float(x) * k, float(y) * k) for x, y in out]

    for part in filled:
        draw.polygon(place(_polygon(part)), fill=255)
    for part in holes:
        draw.polygon(place(_polygon(part) * scale + shift), fill=0)
    rounding = rng.uniform(0, 0.8) * k
    if rounding > 0.5:  # blur and re-threshold at the supersampled scale: rounded corners, same area
        canvas = canvas.filter(ImageFilter.GaussianBlur(rounding)).point(lambda v: 255 if v >= 128 else 0)
    return _coverage(canvas)


# ---------------------------------------------------------------- malformed objects


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    return canvas, ImageDraw.Draw(canvas)


def _coverage(canvas: Image.Image) -> np.ndarray:
    return _downsample(np.asarray(canvas, dtype=np.float64) / 255)


def _across(obj: Obj, angle: float, offset: float) -> np.ndarray:
    """Signed distance of every pixel centre from the line through ``obj``'s centre shifted by
    ``offset`` along the direction ``angle``."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    return (xs - obj.cx) * math.cos(angle) + (ys - obj.cy) * math.sin(angle) - offset


def _fused(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """Two classes at one place, one's left (or top) half joined to the other's other half."""
    a, b = rng.choice(len(SHAPES), size=2, replace=False)
    first, second = (
        silhouette(Obj(SHAPES[a], "red", obj.cx, obj.cy, obj.size)),
        silhouette(Obj(SHAPES[b], "red", obj.cx, obj.cy, obj.size)),
    )
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    side = (xs < obj.cx) if rng.integers(2) else (ys < obj.cy)
    return np.where(side, first, second)


def _cut(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """The shape with everything beyond a random line through its middle third removed (a third to
    two thirds of it gone)."""
    angle, offset = rng.uniform(0, 2 * math.pi), rng.uniform(-obj.size / 6, obj.size / 6)
    return silhouette(obj) * (_across(obj, angle, offset) < 0)


def _blob(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """Three to five random ellipses spread over the object's box."""
    canvas, draw = _canvas()
    k, h = SUPERSAMPLE, obj.size / 2
    for _ in range(int(rng.integers(3, 6))):
        cx, cy = obj.cx + rng.uniform(-0.6 * h, 0.6 * h), obj.cy + rng.uniform(-0.6 * h, 0.6 * h)
        rx, ry = rng.uniform(h / 5, h / 2, size=2)
        draw.ellipse(((cx - rx) * k, (cy - ry) * k, (cx + rx) * k, (cy + ry) * k), fill=255)
    return _coverage(canvas)


def _squashed(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """The shape scaled to an aspect ratio of 1.7-2.5 along x or y."""
    canvas, draw = _canvas()
    big = Obj(obj.shape, "red", SIZE / 2, SIZE / 2, obj.size)
    _draw(draw, big, 255, 0)
    aspect = rng.uniform(1.7, 2.5)
    w, h = SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE
    size = (int(w / aspect), h) if rng.integers(2) else (w, int(h / aspect))
    squashed = Image.new("L", (w, h), 0)
    squashed.paste(canvas.resize(size, Image.BILINEAR), ((w - size[0]) // 2, (h - size[1]) // 2))
    dx, dy = int((obj.cx - SIZE / 2) * SUPERSAMPLE), int((obj.cy - SIZE / 2) * SUPERSAMPLE)
    shifted = Image.new("L", (w, h), 0)
    shifted.paste(squashed, (dx, dy))
    return _coverage(shifted)


def _pieces(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """The shape crossed by a background band 2-4 px wide, through its middle third (pieces)."""
    angle, offset = rng.uniform(0, math.pi), rng.uniform(-obj.size / 6, obj.size / 6)
    width = rng.uniform(2, 4)
    return silhouette(obj) * (np.abs(_across(obj, angle, offset)) > width / 2)


def _merged(obj: Obj, rng: np.random.Generator) -> np.ndarray:
    """Two shapes whose boxes overlap by 0.3 of their size (one connected component)."""
    other = SHAPES[int(rng.integers(len(SHAPES)))]
    angle = rng.uniform(0, 2 * math.pi)
    step = obj.size * 0.5
    first = Obj(
        obj.shape, "red", obj.cx - step / 2 * math.cos(angle), obj.cy - step / 2 * math.sin(angle), obj.size * 0.8
    )
    second = Obj(other, "red", obj.cx + step / 2 * math.cos(angle), obj.cy + step / 2 * math.sin(angle), obj.size * 0.8)
    return np.maximum(silhouette(first), silhouette(second))


MALFORMATIONS = {
    "fused": _fused,
    "cut": _cut,
    "blob": _blob,
    "squashed": _squashed,
    "pieces": _pieces,
    "merged": _merged,
}


def paint(coverages: list[np.ndarray], colours: list[str]) -> np.ndarray:
    """uint8 image of coverage maps painted over the background grey, as the renderer blends edges."""
    image = np.broadcast_to(np.array(BACKGROUND, dtype=np.float64), (SIZE, SIZE, 3)).copy()
    for cover, name in zip(coverages, colours, strict=True):
        image += cover[..., None] * (np.array(PALETTE[name], dtype=np.float64) - image)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def malformed(obj: Obj, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The coverage map of ``obj`` malformed as ``kind`` (a key of :data:`MALFORMATIONS`)."""
    return MALFORMATIONS[kind](obj, rng)
