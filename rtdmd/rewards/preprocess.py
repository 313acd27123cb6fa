"""Image preprocessing of the reward models, in two paths.

* the **tensor path** (differentiable): float images ``[B, 3, H, W]`` in [0, 1] -> resize, crop or
  pad, normalise, all on tensors (``torchvision.transforms.v2.functional``), so gradients reach
  the image; this is what reward back-propagation and RL use;
* the **reference path**: uint8 images (what a saved PNG holds) through the PIL preprocessing of
  the metric's official code (bicubic PIL resize of the shortest side, centre crop, ``ToTensor``,
  normalise), so scores equal the reference implementation's.

The two differ by the resampling filter's arithmetic and the uint8 rounding; each metric's tests
and ``bench/perf/rewards.py`` measure the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

Interpolation = Literal["bilinear", "bicubic"]


def _mode(interpolation: Interpolation):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR


def normalize(images: Tensor, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> Tensor:
    """``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def resize_shortest_crop(images: Tensor, size: int, interpolation: Interpolation = "bicubic") -> Tensor:
    """Resize the shortest side to ``size`` (antialiased), then centre-crop ``size x size``
    (torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on tensors)."""
    from torchvision.transforms.v2 import functional as TF

    resized = TF.resize(images, [size], interpolation=_mode(interpolation), antialias=True)
    return TF.center_crop(resized, [size, size])


def resize_longest_pad(
    images: Tensor, size: int, interpolation: Interpolation = "bicubic", antialias: bool = True
) -> Tensor:
    """HPSv2's ``ResizeMaxSize``: scale so the longest side is ``size`` (``round`` of each side),
    then zero-pad to ``size x size``, the odd pixel on the right/bottom; inputs whose longest side is
    ``size`` pass unchanged. ``antialias=False`` is torchvision < 0.17's tensor resize (the official
    transform leaves it to torchvision's default)."""
    from torchvision.transforms.v2 import functional as TF

    height, width = images.shape[-2:]
    scale = size / max(height, width)
    if scale == 1.0:
        return images
    new_h, new_w = round(height * scale), round(width * scale)
    images = TF.resize(images, [new_h, new_w], interpolation=_mode(interpolation), antialias=antialias)
    pad_h, pad_w = size - new_h, size - new_w
    return TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)


def clip_tensor(images: Tensor, size: int = 224, interpolation: Interpolation = "bicubic") -> Tensor:
    """The CLIP-family tensor path: shortest side to ``size``, centre crop, OpenAI normalisation."""
    return normalize(resize_shortest_crop(images.float(), size, interpolation))


def to_pil(images: Tensor | np.ndarray | Sequence) -> list[Image.Image]:
    """Float ``[B, 3, H, W]`` in [0, 1] (rounded to uint8 as a saved PNG), uint8 ``[B, H, W, 3]``,
    or PIL images -> RGB PIL images."""
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8:
            images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            images = images.permute(0, 2, 3, 1)
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        return [Image.fromarray(np.ascontiguousarray(image)) for image in images]
    return [image.convert("RGB") for image in images]


def clip_reference(images, size: int = 224) -> Tensor:
    """The reference path of OpenAI CLIP's ``preprocess`` (and of ``CLIPImageProcessor`` for square
    crops): PIL bicubic resize of the shortest side, centre crop, ``ToTensor``, OpenAI normalisation."""
    from torchvision import transforms as T

    chain = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    return torch.stack([chain(image) for image in to_pil(images)])
