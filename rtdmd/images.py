"""Images as the harness and the trainer keep them: uint8 pixels, PNG files, grids."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from PIL import Image

from rtdmd.files import write_bytes_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8 (round half to even, as torchvision does)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_png(pixels: torch.Tensor, path: Path) -> str:
    """Write one [H, W, 3] uint8 image atomically; return the file's sha256 (of the bytes written).
    Safe to call from several threads at once: Pillow's encoder and hashlib release the GIL."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def grid(pixels: list[torch.Tensor], columns: int) -> Image.Image:
    """[H, W, 3] uint8 images in rows of ``columns``, on white."""
    h, w, _ = pixels[0].shape
    rows = (len(pixels) + columns - 1) // columns
    canvas = torch.full((rows * h, columns * w, 3), 255, dtype=torch.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return Image.fromarray(canvas.numpy())
