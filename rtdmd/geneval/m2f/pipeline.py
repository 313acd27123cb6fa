"""The detector's pre- and post-processing as mmdet does them for GenEval (not as ``transformers``'
Mask2Former image processor does).

Pre-processing, ``mmdet2`` (the default: official GenEval runs mmdet 2.x): rescale the uint8 image with
OpenCV's bilinear resize (reproduced bit for bit in torch: :mod:`rtdmd.geneval.m2f.resize`) so that it fits 1333 x 800 (``s = min(1333 / long side, 800 / short side)``,
sizes rounded half up), pad bottom/right to multiples of 32 with the value 128, then normalise with
ImageNet's mean and std as mmcv does on OpenCV 4 (``x - mean`` in float32, times ``1 / std`` in float64,
rounded to float32; OpenCV 5 multiplies in float32, one float32 step away in a quarter of the values). ``mmdet3`` (mmdet 3.3,
our reference worker): its config loads the image as float32 first, so the resize is OpenCV's float
bilinear (IPP's; :func:`~rtdmd.geneval.m2f.resize.resize_bilinear_float`), no longer rounded to uint8;
then ``(x - mean) / std`` and padding with 0 after normalising. The two differ by the float resize
(up to 0.75 grey levels per pixel) and, where an image needs padding, the pad value: a square 512 or
1024 px image becomes 800 x 800, a multiple of 32.

Post-processing (``MaskFormerFusionHead.instance_postprocess``): mask logits bilinearly resized to the
padded size, cropped to the resized image, resized to the original size (two steps, in this order);
the top 100 of the 100 queries x 80 classes by class probability; a binary mask ``logit > 0``; score =
class probability x the mean mask probability inside the binary mask; the box is the mask's extent.
With a score floor (GenEval's 0.3) only the pairs whose class probability passes it get their masks
resized: a score is at most its class probability, so the detections above the floor are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rtdmd.geneval.m2f.resize import resize_bilinear_float, resize_bilinear_u8

MEAN = (123.675, 116.28, 103.53)  # RGB
STD = (58.395, 57.12, 57.375)
SCALE = (1333, 800)
SIZE_DIVISOR = 32
PAD_VALUE = 128  # mmdet 2.x pads the uint8 image before normalising
MAX_DETECTIONS = 100

Preprocessing = Literal["mmdet2", "mmdet3"]


def rescaled_size(height: int, width: int, scale: tuple[int, int] = SCALE) -> tuple[int, int]:
    """``(h, w)`` after mmcv's ``imrescale`` to fit ``scale`` (long, short) keeping the aspect ratio."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


@dataclass(frozen=True)
class Prepared:
    """One image ready for the network: ``tensor [3, H_pad, W_pad]`` float32 normalised RGB, and the
    sizes post-processing maps back through."""

    tensor: Tensor
    resized: tuple[int, int]
    original: tuple[int, int]


def preprocess_batch(images: Tensor, mode: Preprocessing = "mmdet2") -> tuple[Tensor, tuple[int, int]]:
    """``images [B, H, W, 3]`` uint8 RGB of one size -> the network's input ``[B, 3, H_pad, W_pad]`` and the
    resized size, on the images' device; each image's tensor bit-identical to its own :func:`preprocess`."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"the detector takes [H, W, 3] uint8 RGB images, got {images.dtype} {tuple(images.shape[1:])}")
    h, w = images.shape[1:3]
    new_h, new_w = rescaled_size(h, w)
    pad_h, pad_w = (-new_h) % SIZE_DIVISOR, (-new_w) % SIZE_DIVISOR
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device)[:, None, None]
    if mode == "mmdet2":  # after padding with 128, mmcv's imnormalize: cv2.subtract, then cv2.multiply by
        # 1 / float64(float32 std), which OpenCV 4 (GenEval's) computes in float64 and rounds once
        resized = resize_bilinear_u8(images, new_h, new_w)
        padded = F.pad(resized.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), value=PAD_VALUE)
        inv_std = 1 / torch.tensor(STD, dtype=torch.float32, device=images.device).double()
        tensor = ((padded.float() - mean).double() * inv_std[:, None, None]).float()
    elif mode == "mmdet3":  # DetDataPreprocessor: (x - mean) / std, then pad with 0
        std = torch.tensor(STD, dtype=torch.float32, device=images.device)[:, None, None]
        resized = resize_bilinear_float(images, new_h, new_w)
        tensor = F.pad((resized.permute(0, 3, 1, 2) - mean) / std, (0, pad_w, 0, pad_h))
    else:
        raise ValueError(f"preprocessing {mode!r}: choose mmdet2 (official GenEval) or mmdet3")
    return tensor.contiguous(), (new_h, new_w)


def preprocess(
    image: np.ndarray | Tensor, mode: Preprocessing = "mmdet2", device: str | torch.device | None = None
) -> Prepared:
    """``image``: ``[H, W, 3]`` uint8 RGB (as decoded from a PNG), numpy or a tensor; processed on
    ``device`` (default: where the tensor is, else the CPU), bit-identical on any device."""
    pixels = torch.as_tensor(image, device=device)
    if pixels.ndim != 3:
        raise ValueError(f"the detector takes [H, W, 3] uint8 RGB images, got {pixels.dtype} {tuple(pixels.shape)}")
    tensor, resized = preprocess_batch(pixels[None], mode)
    return Prepared(tensor[0], resized, tuple(pixels.shape[:2]))


@dataclass(frozen=True)
class Detections:
    """One image's instances, by descending score: ``labels [N]`` (COCO index 0-79), ``scores [N]``,
    ``boxes [N, 4]`` (x0, y0, x1, y1; right and bottom exclusive), ``masks [N, H, W]`` bool, and the
    decoder query each came from (``queries [N]``; a query may give several classes)."""

    labels: Tensor
    scores: Tensor
    boxes: Tensor
    masks: Tensor
    queries: Tensor

    def head(self, n: int) -> Detections:
        """The ``n`` best."""
        return Detections(self.labels[:n], self.scores[:n], self.boxes[:n], self.masks[:n], self.queries[:n])


def mask_boxes(masks: Tensor) -> Tensor:
    """``[N, 4]`` float boxes ``(x_min, y_min, x_max + 1, y_max + 1)`` of bool masks; zeros for an empty mask
    (vectorised: no per-mask device round trip)."""
    rows, cols = masks.any(2), masks.any(1)  # [N, H], [N, W]
    h, w = rows.shape[1], cols.shape[1]
    y0, x0 = rows.int().argmax(1), cols.int().argmax(1)
    y1, x1 = h - rows.flip(1).int().argmax(1), w - cols.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return boxes * rows.any(1, keepdim=True)


def top_pairs(class_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``class_logits [..., 100, 81]`` -> the top 100 (query, class) pairs by class probability (the
    softmax without "no object"), descending: ``scores, queries, labels``, each ``[..., 100]``."""
    probs = class_logits.softmax(-1)[..., :-1]
    classes = probs.shape[-1]
    scores, index = probs.flatten(-2).topk(MAX_DETECTIONS, dim=-1, sorted=True)
    return scores, index // classes, index % classes


def instances(
    scores: Tensor,
    queries: Tensor,
    labels: Tensor,
    mask_logits: Tensor,
    padded: tuple[int, int],
    resized: tuple[int, int],
    original: tuple[int, int],
) -> Detections:
    """One image's pairs (any prefix of :func:`top_pairs`' order) and ``mask_logits [100, H/4, W/4]`` -> its
    detections: only the chosen queries' masks are resized (each mask resizes on its own)."""
    if not len(queries):  # nothing to resize (interpolate refuses an empty batch on CUDA)
        empty = torch.zeros(0, *original, dtype=torch.bool, device=mask_logits.device)
        return Detections(labels, scores, mask_boxes(empty), empty, queries)
    chosen = F.interpolate(mask_logits[queries][None], padded, mode="bilinear", align_corners=False)
    h, w = resized
    chosen = F.interpolate(chosen[:, :, :h, :w], original, mode="bilinear", align_corners=False)[0]
    binary = chosen > 0
    mask_scores = (chosen.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final = scores * mask_scores
    order = final.argsort(descending=True, stable=True)
    return Detections(labels[order], final[order], mask_boxes(binary[order]), binary[order], queries[order])


def postprocess_batch(
    class_logits: Tensor,
    mask_logits: Tensor,
    padded: tuple[int, int],
    resized: tuple[int, int],
    original: tuple[int, int],
    min_score: float | None = None,
) -> list[Detections]:
    """``class_logits [B, 100, 81]``, ``mask_logits [B, 100, H/4, W/4]`` of images of one size -> each
    image's detections. ``min_score``: keep only detections scoring above it; pairs whose class
    probability is not above it are dropped before their masks are resized, exactly: a score is the
    class probability times a mean probability (at most 1). Two waits for the device per batch (how many
    pairs pass, then how many detections)."""
    scores, queries, labels = top_pairs(class_logits)
    # prefixes: the pairs' scores descend
    counts = [scores.shape[1]] * len(scores) if min_score is None else (scores > min_score).sum(1).tolist()
    found = [
        instances(scores[r, :n], queries[r, :n], labels[r, :n], mask_logits[r], padded, resized, original)
        for r, n in enumerate(counts)
    ]
    if min_score is None or not found:
        return found
    kept = torch.stack([(f.scores > min_score).sum() for f in found]).tolist()
    return [f.head(n) for f, n in zip(found, kept, strict=True)]


def postprocess(
    class_logits: Tensor,
    mask_logits: Tensor,
    padded: tuple[int, int],
    prepared: Prepared,
    min_score: float | None = None,
) -> Detections:
    """``class_logits [100, 81]``, ``mask_logits [100, H/4, W/4]`` of one image -> its detections
    (:func:`postprocess_batch` of one)."""
    (found,) = postprocess_batch(
        class_logits[None], mask_logits[None], padded, prepared.resized, prepared.original, min_score
    )
    return found


def pack_bits(masks: Tensor) -> Tensor:
    """Bool ``masks`` -> uint8 ``[ceil(n / 8)]`` in ``np.packbits``' order (the first element in the high
    bit): an eighth of the bytes to copy to the host, where ``np.unpackbits`` restores them."""
    flat = masks.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=masks.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
