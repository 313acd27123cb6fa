"""OpenCV's bilinear resize of uint8 images (``cv2.resize(..., INTER_LINEAR)``), bit for bit, in torch,
so the detector's pre-processing runs on any device without OpenCV.

OpenCV resizes 8-bit images in fixed point: per output column ``x``, ``f = float32((x + 0.5) / r - 0.5)``
with ``r`` = the size ratio, source column ``floor(f)`` and weights ``round(2048 (1 - f'))``,
``round(2048 f')`` (``f'`` the fraction; columns past either edge take the edge pixel with weight
2048); the horizontal pass keeps the exact integer sums; the vertical pass (its SIMD kernel, which
every x86 build runs) computes ``((s0 >> 4) b0 >> 16) + ((s1 >> 4) b1 >> 16)`` and rounds with
``(v + 2) >> 2``. Tested equal to OpenCV on random images and sizes (``tests/test_geneval_port.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)


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
    """``image [H, W, C]`` uint8 -> ``[height, width, C]`` uint8, as ``cv2.resize(image, (width, height),
    interpolation=cv2.INTER_LINEAR)``."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected [H, W, C] uint8, got {image.dtype} {tuple(image.shape)}")
    h, w = image.shape[:2]
    x0, x1, a0, a1 = axis_taps(w, width, True, image.device)
    y0, y1, b0, b1 = axis_taps(h, height, False, image.device)
    pixels = image.long()
    rows = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]  # [H, width, C], exact
    top, bottom = rows[y0] >> 4, rows[y1] >> 4
    mixed = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    return ((mixed + 2) >> 2).clamp(0, 255).to(torch.uint8)
