"""The toy detector's recogniser: a small CNN that reads one segmented object and says which of the
eight classes it is, or that it is none of them (``reject``: fragments, fused or squashed shapes,
blobs), with a calibrated confidence.

Input: the object's coverage map (:func:`rtdmd.toyworld.detector.coverage`, colour-free, in [0, 1])
in a square window around its box, with :data:`PAD_FRACTION` of margin, resampled to
``CROP`` x ``CROP`` (area-weighted, so sizes 12-40 px read alike). Output: ``softmax(logits / T)``
over ``SHAPES + ("reject",)``, with the temperature ``T`` fitted after training on held-out samples
(minimum negative log-likelihood). Inference runs in float64, so scores agree across CPUs.

Training data (:func:`rtdmd.toyworld.recognizer_data.training_sample`): scenes of one to three objects of random class, colour and
size, half of them drawn with a generator's errors (:func:`rtdmd.toyworld.degrade.varied`), some
scenes with one object malformed (:data:`rtdmd.toyworld.degrade.MALFORMATIONS`), then mild
degradations (:data:`rtdmd.toyworld.degrade.TRAINING_DEGRADATIONS`); each segmented component is
labelled with the class of the object whose mask it matches (IoU >= ``MATCH_IOU``), else ``reject``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rtdmd.checkpoint import load_tensors, save_tensors
from rtdmd.toyworld.world import SHAPES

CLASSES = (*SHAPES, "reject")
REJECT = len(SHAPES)
CROP = 32
PAD_FRACTION = 0.15
MATCH_IOU = 0.6
FORMAT = "rtdmd-toy-recognizer-1"


@dataclass(frozen=True)
class RecognizerArch:
    widths: tuple[int, ...] = (16, 32, 64)  # each stage: a 3x3 conv, then a stride-2 3x3 conv
    groups: int = 4
    hidden: int = 128


class Recognizer(nn.Module):
    """``[B, 1, CROP, CROP]`` coverage crops -> ``[B, len(CLASSES)]`` logits (before the temperature)."""

    def __init__(self, arch: RecognizerArch = RecognizerArch(), temperature: float = 1.0) -> None:
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        c_in = 1
        for width in arch.widths:
            for stride in (1, 2):
                layers += [
                    nn.Conv2d(c_in, width, 3, stride=stride, padding=1),
                    nn.GroupNorm(arch.groups, width),
                    nn.GELU(),
                ]
                c_in = width
        side = CROP // 2 ** len(arch.widths)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(c_in * side * side, arch.hidden), nn.GELU(), nn.Linear(arch.hidden, len(CLASSES))
        )
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, crops: Tensor) -> Tensor:
        return self.head(self.features(crops))

    def probabilities(self, crops: Tensor) -> Tensor:
        """Calibrated class probabilities ``softmax(logits / T)``."""
        return torch.softmax(self(crops) / self.temperature, dim=-1)

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:

        metadata = {"format": FORMAT, "arch": json.dumps(asdict(self.arch)), "classes": json.dumps(CLASSES)}
        return save_tensors(self.state_dict(), path, metadata={**metadata, **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> Recognizer:
        """A recogniser from :meth:`save`'s file, in float64 and eval mode."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a toy recogniser (format {metadata.get('format')!r}, want {FORMAT!r})")
        if tuple(json.loads(metadata["classes"])) != CLASSES:
            raise ValueError(f"{path} was trained for the classes {metadata['classes']}, this world has {CLASSES}")
        fields = json.loads(metadata["arch"])
        model = cls(RecognizerArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}))
        model.load_state_dict(load_tensors(path), strict=True)
        return model.double().eval().requires_grad_(False)


def crop(alpha: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``[CROP, CROP]`` float64: the square window of side ``max(w, h) (1 + 2 PAD_FRACTION)`` centred on
    ``box`` (zeros beyond the image), resampled by area-weighted averaging (exact: each output pixel is
    the mean of the coverage over its footprint)."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * PAD_FRACTION)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    edges = np.linspace(-side / 2, side / 2, CROP + 1)
    return _area_matrix(cy + edges, alpha.shape[0]) @ alpha @ _area_matrix(cx + edges, alpha.shape[1]).T


def _area_matrix(edges: np.ndarray, n: int) -> np.ndarray:
    """``[len(edges) - 1, n]``: row i averages pixels 0..n-1 over the interval ``[edges[i], edges[i+1])``
    (each pixel p covers ``[p, p + 1)``; outside the image counts as 0)."""
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(n)[None]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0, None)
    return overlap / (hi - lo)
