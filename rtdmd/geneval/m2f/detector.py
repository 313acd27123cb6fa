"""The ported detector in this process: uint8 RGB images -> :class:`ImageDetections`, the same
contract as the mmdet worker's client, batched and on any device.

Images of one size go through the network together (GenEval's images share one size); float32
throughout with TF32 off, as the official detector (mmdet on torch 1.12 multiplies matrices in full
float32; its convolutions may use TF32, which moves borderline scores: left out, as the tests).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from rtdmd.geneval.client import ImageDetections
from rtdmd.geneval.judge import CLASSNAMES
from rtdmd.geneval.m2f.head import CLASSES
from rtdmd.geneval.m2f.model import Mask2Former, load_detector
from rtdmd.geneval.m2f.pipeline import Detections, Preprocessing, pack_bits, postprocess_batch, preprocess_batch


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
    (GenEval never uses one at or below 0.3). Eager on purpose: ``torch.compile`` of the whole network
    was slower on an H200 (25.2 against 27.3 images/s at batch 32: inductor's own grid sampling costs
    more than it fuses)."""

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
        """``images``: uint8 RGB ``[H, W, 3]`` -> their detections, in order, by descending score. Images of
        one size are pre-processed and detected together, ``batch_size`` at a time; a batch that runs out
        of device memory is detected in halves, and later batches keep the smaller size (with a warning)."""
        out: list[ImageDetections | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(np.shape(image)), []).append(i)
        with tf32_off():
            for members in by_size.values():
                start = 0
                while start < len(members):
                    chunk = members[start : start + self.batch_size]
                    try:
                        found = self._detect_chunk([images[i] for i in chunk])
                    except torch.OutOfMemoryError:
                        if len(chunk) == 1:
                            raise
                        self.batch_size = len(chunk) // 2
                        warnings.warn(
                            f"GenEval detector: out of device memory at batch {len(chunk)}; "
                            f"continuing at batch {self.batch_size}",
                            stacklevel=2,
                        )
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    for i, detections in zip(chunk, found, strict=True):
                        out[i] = detections
                    start += len(chunk)
        return out

    def _detect_chunk(self, images: list[np.ndarray]) -> list[ImageDetections]:
        # each image to the device, stacked there: no host-side copy of the whole chunk first
        pixels = torch.stack([torch.as_tensor(np.asarray(image), device=self.device) for image in images])
        batch, resized = preprocess_batch(pixels, self.preprocessing)
        classes, masks = self.model(batch)
        found = postprocess_batch(
            classes, masks, tuple(batch.shape[2:]), resized, tuple(pixels.shape[1:3]), self.min_score
        )
        return [self.to_host(detections) for detections in found]

    @staticmethod
    def to_host(det: Detections) -> ImageDetections:
        """The client's arrays; the masks cross as bits."""
        shape = tuple(det.masks.shape)
        # 0/1 bytes viewed as bool: astype(bool) would copy them again (~2 ms for 34 masks of 512 px)
        masks = np.unpackbits(pack_bits(det.masks).cpu().numpy(), count=int(np.prod(shape))).view(bool)
        return ImageDetections(
            boxes=det.boxes.cpu().numpy().astype(np.float32),
            scores=det.scores.cpu().numpy().astype(np.float32),
            labels=det.labels.cpu().numpy().astype(np.int64),
            masks=masks.reshape(shape),
        )

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to stop: the model lives in this process."""
