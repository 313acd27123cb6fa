"""The real GenEval metric (metrics.md §8): Mask2Former Swin-S detections, the CLIP colour classifier
and the official decision rules of :func:`rtdmd.geneval.judge.judge`.

Per image: float ``[3, H, W]`` in [0, 1] -> uint8 (``round(255 x)``, the pixels a saved PNG holds) ->
PNG -> the detector worker (mmdet 3.x in ``tox -e geneval-mmdet``, reads the file with OpenCV, BGR,
as the official script) -> :class:`Detection` per instance (GenEval's class name, the box, score and
mask) -> ``judge(metadata, detections, image, colour classifier)``.

``geneval`` scores 1.0 / 0.0 by the official rule; ``geneval-strict`` and ``geneval-partial`` are the
RL repositories' variants (exact counts; per-clause partial credit). The three share one
:class:`GenEvalScorer` per configuration, and its verdicts are cached by the sha256 of the pixels and
the metadata, so scoring the three costs one detection.

Weights: the mmdet-3.x Mask2Former checkpoint (URL below; checked against the sha256 prefix in its
name) and OpenAI CLIP ViT-L/14 through open_clip. The overall GenEval score is the mean of the six
per-task means (``aggregate="category_mean"``; :mod:`rtdmd.geneval.summary` writes the official text).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from rtdmd.geneval.client import DetectorClient, ImageDetections, default_python, worker_command
from rtdmd.geneval.colour import CLIP_L14_OPENAI, ClipColorClassifier
from rtdmd.geneval.judge import CLASSNAMES, ColorClassifier, Detection, Verdict, filter_detections, judge
from rtdmd.geneval.worker import CHECKPOINT_URL
from rtdmd.rewards.base import REWARDS, RewardInfo
from rtdmd.rewards.geneval import geneval_info
from rtdmd.weights import WeightFiles, locate, resolve_all, sha256_of, weights_root

MASK2FORMER = WeightFiles(url=CHECKPOINT_URL)
# GenEval's own download (evaluation/download_models.sh): the same weights with mmdet 2.x names. The
# port reads it as well; the mmdet 3.x worker cannot (it would load it non-strictly and score 0).
GENEVAL_CHECKPOINT = WeightFiles(
    url="https://download.openmmlab.com/mmdetection/v2.0/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/"
    "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth"
)
MIN_SCORE = 0.3  # the lowest GenEval threshold: the worker drops detections at or below it (judge keeps > 0.3)
VERDICT_CACHE_SIZE = 8192


def to_uint8(images: Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] -> ``[B, H, W, 3]`` uint8, ``round(255 clamp(x, 0, 1))`` (half to even)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_detections(found: ImageDetections, classnames: Sequence[str] = CLASSNAMES) -> list[Detection]:
    """The worker's arrays as :class:`Detection` objects in mmdet's order (the judge sorts per class)."""
    return [
        Detection(label=classnames[int(label)], box=tuple(float(v) for v in box), score=float(score), mask=mask)
        for box, score, label, mask in zip(found.boxes, found.scores, found.labels, found.masks, strict=True)
    ]


def official_details(detections: Sequence[Detection], tag: str) -> dict[str, list[list[float]]]:
    """The ``details`` column of ``evaluate_images.py``: per kept class, ``[x1, y1, x2, y2, score]`` rows."""
    return {label: [[*d.box, d.score] for d in dets] for label, dets in filter_detections(detections, tag).items()}


def check_checkpoint(path: Path, url: str = CHECKPOINT_URL) -> None:
    """Refuse a checkpoint whose sha256 does not start with the digits in its published name (``url``'s)."""
    prefix = url.rsplit("-", 1)[-1].removesuffix(".pth")
    digest = sha256_of(path)
    if not digest.startswith(prefix):
        raise ValueError(f"{path}: sha256 {digest[:16]}... does not start with {prefix} (download it from {url})")


def _key(pixels: np.ndarray, metadata: dict) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode())
    return digest.hexdigest() + json.dumps(metadata, sort_keys=True)


class _RecordColours:
    """First pass of batched colours: records each ``(crops, classname)`` call, answers no colour. Which
    calls the judge makes depends on the detections only, never on earlier colour answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[list, str]] = []

    def __call__(self, crops, classname: str) -> list[str]:
        self.requests.append((list(crops), classname))
        return [""] * len(crops)


class _ReplayColours:
    """Second pass: the batched answers, in the order the first pass asked."""

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = iter(answers)

    def __call__(self, crops, classname: str) -> list[str]:
        return next(self.answers)


class GenEvalScorer:
    """Detections from a worker, colours from ``color_classifier``, verdicts from ``judge``; cached.

    ``batch_colours``: classify the colour crops of all images of a call together
    (``color_classifier.classify_many``) instead of one call per image and class as the official
    script does: faster on a GPU; the same answers in float32, possibly not in fp16 near ties."""

    def __init__(
        self, detector: DetectorClient, color_classifier: ColorClassifier, batch_colours: bool = False
    ) -> None:
        if detector.classes and len(detector.classes) != len(CLASSNAMES):
            raise ValueError(f"the detector has {len(detector.classes)} classes; GenEval needs the 80 COCO classes")
        if batch_colours and not hasattr(color_classifier, "classify_many"):
            raise ValueError("batch_colours needs a colour classifier with classify_many")
        self.detector = detector
        self.color_classifier = color_classifier
        self.batch_colours = batch_colours
        self._verdicts: OrderedDict[str, tuple[Verdict, dict]] = OrderedDict()

    def _judge_all(self, metas: list[dict], detections: list[list[Detection]], images: list) -> list[Verdict]:
        if not self.batch_colours:
            return [judge(m, d, im, self.color_classifier) for m, d, im in zip(metas, detections, images, strict=True)]
        recorders = [_RecordColours() for _ in metas]
        for m, d, im, rec in zip(metas, detections, images, recorders, strict=True):
            judge(m, d, im, rec)
        answers = iter(self.color_classifier.classify_many([r for rec in recorders for r in rec.requests]))
        replays = [_ReplayColours([next(answers) for _ in rec.requests]) for rec in recorders]
        return [judge(m, d, im, rep) for m, d, im, rep in zip(metas, detections, images, replays, strict=True)]

    def evaluate(self, pixels: np.ndarray, meta: Sequence[dict[str, Any]]) -> list[tuple[Verdict, dict]]:
        """``(verdict, details)`` per uint8 ``[H, W, 3]`` image; undetected images go to the worker in one call."""
        from PIL import Image

        if len(meta) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(meta)} metadata rows")
        keys = [_key(p, m) for p, m in zip(pixels, meta, strict=True)]
        todo = [keys.index(key) for key in dict.fromkeys(keys) if key not in self._verdicts]
        detections = [to_detections(found) for found in self.detector.detect([pixels[i] for i in todo])]
        images = [Image.fromarray(pixels[i], "RGB") for i in todo]
        verdicts = self._judge_all([meta[i] for i in todo], detections, images)
        for i, found, verdict in zip(todo, detections, verdicts, strict=True):
            self._verdicts[keys[i]] = (verdict, official_details(found, meta[i]["tag"]))
        out = []
        for key in keys:
            self._verdicts.move_to_end(key)
            out.append(self._verdicts[key])
        while len(self._verdicts) > VERDICT_CACHE_SIZE:
            self._verdicts.popitem(last=False)
        return out

    def forget(self) -> None:
        """Drop the cached verdicts (the next :meth:`evaluate` detects and judges again)."""
        self._verdicts.clear()

    def close(self) -> None:
        self.detector.close()


_SCORERS: dict[tuple, GenEvalScorer] = {}  # one detector per configuration, shared by the three variants
BACKENDS = ("port", "mmdet")
BACKEND_ENV = "RTDMD_GENEVAL_BACKEND"  # set by `rtdmd-bench --geneval-backend`


def backend_of(backend: str | None) -> str:
    """``backend``, else ``$RTDMD_GENEVAL_BACKEND``, else ``port`` (the detector in this process)."""
    chosen = backend or os.environ.get(BACKEND_ENV) or "port"
    if chosen not in BACKENDS:
        raise ValueError(f"GenEval backend {chosen!r}: choose one of {', '.join(BACKENDS)}")
    return chosen


def open_scorer(
    weights_dir: str | Path | None = None,
    device: str = "auto",
    color_device: str | None = None,
    amp: bool = True,
    python: str | Path | None = None,
    batch_size: int = 64,
    backend: str | None = None,
    batch_colours: bool = False,
) -> GenEvalScorer:
    """The shared :class:`GenEvalScorer` for these settings, started on first use.

    ``backend``: ``port`` (default; :mod:`rtdmd.geneval.m2f`, in this process, on ``device``) or
    ``mmdet`` (the reference: mmdet in its worker environment, ``tox -e geneval-mmdet``). ``device``:
    the detector's (``auto``: this process's GPU, for the worker when its environment has CUDA ops,
    else the CPU); ``color_device``: the colour CLIP's (default: this process's GPU, else the CPU);
    ``amp``: fp16 autocast of the colour CLIP on a GPU, as clip-benchmark; ``python``: the worker
    environment's interpreter (:func:`default_python`); ``batch_colours``: see :class:`GenEvalScorer`.
    The detector's checkpoint: the port reads GenEval's own download (:data:`GENEVAL_CHECKPOINT`, mmdet
    2.x names) when it is in the weights folder, else the mmdet 3.x copy (:data:`MASK2FORMER`, found or
    fetched), which the worker needs. Checks, in order: both weight files (one message naming each
    missing file and its source), the worker environment, the checkpoint's sha256 prefix."""
    backend = backend_of(backend)
    if device == "auto" and torch.cuda.is_available():  # each rank's detector on that rank's GPU
        device = f"auto:{torch.cuda.current_device()}"
    key = (str(weights_dir), device, color_device, amp, str(python), batch_size, backend, batch_colours)
    if key in _SCORERS and _SCORERS[key].detector.alive():
        return _SCORERS[key]
    # the port takes GenEval's own file when it is there, else (found or fetched) the mmdet 3.x copy
    official = locate(GENEVAL_CHECKPOINT, weights_root(weights_dir)) if backend == "port" else None
    spec = GENEVAL_CHECKPOINT if official else MASK2FORMER
    ckpt_dir, _ = resolve_all("geneval", (spec, CLIP_L14_OPENAI), weights_dir)
    checkpoint = ckpt_dir / spec.names[0]
    if backend == "mmdet":
        python = python or default_python()
    check_checkpoint(checkpoint, spec.url)
    if backend == "mmdet":
        detector = DetectorClient(worker_command(python, checkpoint, device=device), batch_size, min_score=MIN_SCORE)
    else:
        from rtdmd.geneval.m2f.detector import PortDetector

        here = device.replace("auto", "cuda") if device.startswith("auto:") else ("cpu" if device == "auto" else device)
        detector = PortDetector.from_checkpoint(checkpoint, here, batch_size=batch_size, min_score=MIN_SCORE)
    if color_device is None and torch.cuda.is_available():
        color_device = f"cuda:{torch.cuda.current_device()}"
    colour = ClipColorClassifier.from_weights(weights_dir, device=color_device, amp=amp)
    _SCORERS[key] = GenEvalScorer(detector, colour, batch_colours)
    return _SCORERS[key]


VERSION = "mask2former_swin-s-coco-c9d0c4f2+ViT-L-14-quickgelu-openai"
PORT_VERSION = VERSION + "+port-mmdet2"  # the ported detector's scores are cached apart from the worker's
VERSIONS = {"mmdet": VERSION, "port": PORT_VERSION}


class _BackendInfo:
    """A GenEval metric's :class:`RewardInfo` on the class: its version is the backend's in force
    (``$RTDMD_GENEVAL_BACKEND``, default the port), as the scorer of ``rtdmd-bench score`` and the version
    check of ``rtdmd-bench aggregate`` both need it; an instance's own (its detector's) shadows it."""

    def __get__(self, obj, owner) -> RewardInfo:
        return geneval_info(VERSIONS[backend_of(None)], owner.variant)


class _GenEval:
    """``verdict -> float`` over a :class:`GenEvalScorer` (given, or opened with the keyword arguments
    of :func:`open_scorer`)."""

    name: ClassVar[str]
    info = _BackendInfo()
    weights: ClassVar[tuple[WeightFiles, ...]] = (MASK2FORMER, CLIP_L14_OPENAI)
    variant: ClassVar[str] = "official"

    def __init__(self, scorer: GenEvalScorer | None = None, **kwargs) -> None:
        self.scorer = scorer or open_scorer(**kwargs)
        backend = "mmdet" if isinstance(self.scorer.detector, DetectorClient) else "port"
        self.info = geneval_info(VERSIONS[backend], self.variant)

    def verdicts(self, images: Tensor, meta: Sequence[dict[str, Any]]) -> list[tuple[Verdict, dict]]:
        return self.scorer.evaluate(to_uint8(images), meta)

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
        return torch.tensor([v.value(self.variant) for v, _ in self.verdicts(images, meta)], dtype=torch.float32)


@REWARDS.register("geneval")
class GenEval(_GenEval):
    """1.0 if the image satisfies its prompt's GenEval metadata by the official rule, else 0.0."""

    name = "geneval"


@REWARDS.register("geneval-strict")
class GenEvalStrict(_GenEval):
    """The strict variant: exactly ``count`` detections per clause, ``exclude`` ignored."""

    name = "geneval-strict"
    variant = "strict"


@REWARDS.register("geneval-partial")
class GenEvalPartial(_GenEval):
    """The partial-credit variant of Flow-GRPO / DiffusionNFT / RTDMD: the mean of per-clause credits."""

    name = "geneval-partial"
    variant = "partial"


__all__ = [
    "CLASSNAMES",
    "MASK2FORMER",
    "GenEval",
    "GenEvalPartial",
    "GenEvalScorer",
    "GenEvalStrict",
    "check_checkpoint",
    "official_details",
    "open_scorer",
    "to_detections",
    "to_uint8",
]
