"""The ported detector in this process: uint8 RGB images -> :class:`ImageDetections`, the same
contract as the mmdet worker's client, batched and on any device.

Images of one size go through the network together (GenEval's images share one size); float32
throughout with TF32 off, as the official detector (mmdet on torch 1.12 multiplies matrices in full
float32; its convolutions may use TF32, which moves borderline scores: left out, as the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from rtdmd.geneval.client import ImageDetections
from rtdmd.geneval.judge import CLASSNAMES
from rtdmd.geneval.m2f.head import CLASSES
from rtdmd.geneval.m2f.model import Mask2Former, load_detector
from rtdmd.geneval.m2f.pipeline import Preprocessing, postprocess, preprocess


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class PortDetector:
    """``detect(images)`` over :class:`Mask2Former`; detections at or below ``min_score`` are dropped
    (GenEval never uses one at or below 0.3)."""

    def __init__(
        self,
        model: Mask2Former,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        min_score: float | None = None,
        preprocessing: Preprocessing = "mmdet2",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.float().eval().to(self.device)
        # GenEval's names of the head's 80 COCO classes, as the worker reports mmdet's
        self.classes = list(CLASSNAMES[:CLASSES])
        self.batch_size, self.min_score, self.preprocessing = batch_size, min_score, preprocessing

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs) -> PortDetector:
        return cls(load_detector(path), device, **kwargs)

    @torch.no_grad()
    def detect(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        """``images``: uint8 RGB ``[H, W, 3]`` -> their detections, in order, by descending score."""
        prepared = [preprocess(image, self.preprocessing, self.device) for image in images]  # resized on the device
        out: list[ImageDetections | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(prepared):
            by_shape.setdefault(tuple(p.tensor.shape), []).append(i)
        with tf32_off():
            for shape, members in by_shape.items():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start : start + self.batch_size]
                    batch = torch.stack([prepared[i].tensor for i in chunk])
                    classes, masks = self.model(batch)
                    for row, i in enumerate(chunk):
                        out[i] = self._kept(postprocess(classes[row], masks[row], shape[1:], prepared[i]))
        return out

    def _kept(self, det) -> ImageDetections:
        keep = (
            det.scores > self.min_score if self.min_score is not None else torch.ones_like(det.scores, dtype=torch.bool)
        )
        return ImageDetections(
            boxes=det.boxes[keep].cpu().numpy().astype(np.float32),
            scores=det.scores[keep].cpu().numpy().astype(np.float32),
            labels=det.labels[keep].cpu().numpy().astype(np.int64),
            masks=det.masks[keep].cpu().numpy(),
        )

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to stop: the model lives in this process."""
