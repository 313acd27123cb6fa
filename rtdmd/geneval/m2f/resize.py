"""OpenCV's bilinear resize of uint8 images (``cv2.resize(..., INTER_LINEAR)``), bit for bit, in torch,
so the detector's pre-processing runs on any device without OpenCV.

OpenCV resizes 8-bit images in fixed point: per output column ``x``, ``f = float32((x + 0.5) / r - 0.5)``
with ``r`` = the size ratio, source column ``floor(f)`` and weights ``round(2048 (1 - f'))``,
``round(2048 f')`` (``f'`` the fraction; columns past either edge take the edge pixel with weight
2048); the horizontal pass keeps the exact integer sums; the vertical pass (its SIMD kernel, which
every x86 build runs) computes ``((s0 >> 4) b0 >> 16) + ((s1 >> 4) b1 >> 16)`` and rounds with
``(v + 2) >> 2``. Tested equal to OpenCV on random images and sizes (``tests/test_geneval_port.py``).

mmdet 3.x's GenEval config loads images as float32 before resizing, and OpenCV hands float32 resizes
to Intel IPP where the build has it (the ``opencv-python`` wheels do): positions in float64, each pass
``s0 + (s1 - s0) * float32(f)`` with one rounding (a fused multiply-add), horizontal first
(:func:`resize_bilinear_float`). Equal to OpenCV 5.1's result at GenEval's sizes (512 or 1024 px to
800); at extreme upscales (10 x 13 to 800 x 1040) a few border columns differ by one float32 step, and
OpenCV 4.10 (mmdet 3.3's environment, an older IPP) differs on random noise by one step in about one
value in 10,000 of a single column (none on the parity tests' images, ``tests/geneval_mmdet``).
"""

from __future__ import annotations

import torch
from torch import Tensor

COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)


def axis_positions(src: int, dst: int, clamp: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 source position ``(x + 0.5) src / dst - 0.5`` of each output position -> first and second
    source index and the fraction; ``clamp``: past an edge, the edge pixel with fraction 0."""
    position = (torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * (src / dst) - 0.5
    start = torch.floor(position)
    frac = position - start
    start = start.long()
    if clamp:
        outside = (start < 0) | (start >= src - 1)
        frac = torch.where(outside, torch.zeros_like(frac), frac)
    return start.clamp(0, src - 1), (start + 1).clamp(0, src - 1), frac


def lerp_fused(a: Tensor, b: Tensor, weight: Tensor) -> Tensor:
    """``fl(a + (b - a) w)`` in float32 with one rounding of the multiply-add (an FMA): the product and
    sum in float64 are exact for float32 inputs here, then rounded once."""
    return ((b - a).double() * weight.double() + a.double()).float()


def resize_bilinear_float(image: Tensor, height: int, width: int) -> Tensor:
    """``image [..., H, W, C]`` (uint8 or float32) -> float32 ``[..., height, width, C]``, as OpenCV's IPP
    path resizes a float32 image with ``INTER_LINEAR`` (mmdet 3.x's pipeline); leading dims are a batch."""
    h, w = image.shape[-3:-1]
    x0, x1, fx = axis_positions(w, width, True, image.device)
    y0, y1, fy = axis_positions(h, height, False, image.device)
    pixels = image.float()
    rows = lerp_fused(pixels[..., x0, :], pixels[..., x1, :], fx.float()[:, None])
    return lerp_fused(rows[..., y0, :, :], rows[..., y1, :, :], fy.float()[:, None, None])


def axis_taps(src: int, dst: int, clamp_weights: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices ``i0, i1`` and integer weights ``w0, w1`` of each output position along one axis.
    Columns (``clamp_weights``) past an edge put the whole weight on the edge pixel; rows keep their
    weights and read the edge row twice (OpenCV clamps the row index only)."""
    inv_scale = dst / src
    position = ((torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * (1.0 / inv_scale) - 0.5).float()
    start = torch.floor(position)
    frac = position - start
    start = start.long()
    if clamp_weights:
        low, high = start < 0, start >= src - 1
        frac = torch.where(low | high, torch.zeros_like(frac), frac)
        start = torch.where(low, torch.zeros_like(start), torch.where(high, torch.full_like(start, src - 1), start))
    w1 = torch.round(frac * COEF_SCALE).long()  # round half to even, as cvRound
    w0 = torch.round((1 - frac) * COEF_SCALE).long()
    return start.clamp(0, src - 1), (start + 1).clamp(0, src - 1), w0, w1


def resize_bilinear_u8(image: Tensor, height: int, width: int) -> Tensor:
    """``image [..., H, W, C]`` uint8 -> ``[..., height, width, C]`` uint8, as ``cv2.resize(image, (width,
    height), interpolation=cv2.INTER_LINEAR)`` on each image; leading dims are a batch. Exact in int32:
    the horizontal sums stay below 255 x 2048, the vertical products below 2^15 x 2048."""
    if image.dtype != torch.uint8 or image.ndim < 3:
        raise ValueError(f"expected [..., H, W, C] uint8, got {image.dtype} {tuple(image.shape)}")
    h, w = image.shape[-3:-1]
    x0, x1, a0, a1 = axis_taps(w, width, True, image.device)
    y0, y1, b0, b1 = axis_taps(h, height, False, image.device)
    pixels = image.int()
    rows = pixels[..., x0, :] * a0.int()[:, None] + pixels[..., x1, :] * a1.int()[:, None]  # [..., H, width, C]
    top, bottom = rows[..., y0, :, :] >> 4, rows[..., y1, :, :] >> 4
    mixed = ((top * b0.int()[:, None, None]) >> 16) + ((bottom * b1.int()[:, None, None]) >> 16)
    return ((mixed + 2) >> 2).clamp(0, 255).to(torch.uint8)
