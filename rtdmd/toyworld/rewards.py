"""The toy world's rewards: toy GenEval (the toy detector + the shared GenEval judge), toy CLIP
(ToyClip cosine), toy aesthetic (a weight-free flat-colour score) and toy FD (a set metric).

``toy-geneval``, ``toy-geneval-strict`` and ``toy-geneval-partial`` share one detection per image
(the recogniser's confidence as the score); ``toy-geneval-fit`` judges with the geometric fit's soft
IoU instead. Detections are cached by scorer and the sha256 of the image's uint8 pixels (the bytes a
PNG would hold), so scoring the three variants costs one detection.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rtdmd.geneval.judge import judge
from rtdmd.images import to_uint8
from rtdmd.rewards.base import REWARDS, RewardInfo
from rtdmd.rewards.geneval import geneval_info
from rtdmd.seeding import seed_for
from rtdmd.toyworld import detector
from rtdmd.toyworld.clip import ToyClip
from rtdmd.toyworld.prompts import scene_for
from rtdmd.toyworld.world import BACKGROUND, PALETTE, render
from rtdmd.weights import WeightsError, packaged

# ---------------------------------------------------------------- toy GenEval

DETECTION_CACHE_SIZE = 8192  # images; a detection is a few small arrays
_DETECTIONS: OrderedDict[str, list] = OrderedDict()
WORKERS_ENV = "RTDMD_TOY_DETECTOR_WORKERS"  # processes for a batch of detections (default: the CPU count, at most 8)
_POOL: list = []  # the lazily started process pool, reused


def _key(pixels, scorer: str = "learned") -> str:
    return scorer + ":" + hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


def _remember(key: str, found: tuple) -> tuple:
    _DETECTIONS[key] = found
    while len(_DETECTIONS) > DETECTION_CACHE_SIZE:
        _DETECTIONS.popitem(last=False)
    return found


def detections(pixels, scorer: str = "learned") -> tuple:
    """Toy detections of one ``[H, W, 3]`` uint8 image, cached by scorer and the sha256 of its bytes."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    key = _key(pixels, scorer)
    if key in _DETECTIONS:
        _DETECTIONS.move_to_end(key)
        return _DETECTIONS[key]
    return _remember(key, tuple(detector.detect(pixels, scorer)))  # immutable: the variants share it


def _one_thread(parent: int) -> None:
    """Detector workers run the recogniser on one image's few objects at a time: one torch thread each
    (torch's default, every core per process, oversubscribes the machine N-fold). A watchdog thread
    ends the worker when ``parent`` (the pool's owner, passed in: a worker that starts after its death
    must see it gone) is no longer its parent: a SIGKILLed run would otherwise leave its workers, and
    their memory, behind for good."""
    import threading

    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, poll_s: float = 0.5) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(0)


def detect_many(images, scorer: str = "learned") -> list[tuple]:
    """:func:`detections` of many uint8 images; uncached ones in parallel processes when there are
    at least 8 (a learned detection takes ~7 ms, a geometric fit ~50 ms: RL scores hundreds per epoch).
    The detector is deterministic, so the results equal the serial ones exactly."""
    import numpy as np

    images = [np.ascontiguousarray(p, dtype=np.uint8) for p in images]
    keys = [_key(p, scorer) for p in images]
    todo = {k: p for k, p in zip(keys, images, strict=True) if k not in _DETECTIONS}
    workers = int(os.environ.get(WORKERS_ENV, "0")) or min(os.cpu_count() or 1, 8)
    if len(todo) >= 8 and workers > 1:
        if not _POOL or _POOL[0][0] != workers:
            import atexit
            import concurrent.futures
            import multiprocessing

            _POOL.clear()
            context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA or OpenMP threads
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_one_thread, initargs=(os.getpid(),)
            )
            atexit.register(pool.shutdown)
            _POOL.append((workers, pool))
        found = _POOL[0][1].map(
            detector.detect, todo.values(), [scorer] * len(todo), chunksize=max(1, len(todo) // (4 * workers))
        )
        for key, result in zip(todo, found, strict=True):
            _remember(key, tuple(result))
    return [detections(p, scorer) for p in images]


def _verdicts(images: Tensor, meta: Sequence[dict[str, Any]], scorer: str = "learned") -> list:

    if len(meta) != len(images):
        raise ValueError(f"{len(images)} images but {len(meta)} metadata rows")
    pixels = to_uint8(images.detach().float().cpu()).numpy()  # the pixels a PNG of the image holds
    return [judge(m, found) for m, found in zip(meta, detect_many(pixels, scorer), strict=True)]


# the version names the world (2: the eight coarse classes) and the recogniser's weights (a test holds
# this sha against SHA256SUMS): other weights or another world must bump it, as cached scores are
# keyed by version
TOY_GENEVAL_VERSION = "2"
TOY_RECOGNIZER_SHA256 = {"2": "1228b89e4529f089abf2865bc8323ce32787c3b50253957acd4d713749362364"}


class _ToyGenEval:
    variant = "official"
    scorer = "learned"

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
        return torch.tensor([v.value(self.variant) for v in _verdicts(images, meta, self.scorer)])


@REWARDS.register("toy-geneval")
class ToyGenEval(_ToyGenEval):
    """1.0 if the toy detector's detections (scored by the recogniser's confidence) satisfy the
    prompt's GenEval metadata by the official rule."""

    info = geneval_info(TOY_GENEVAL_VERSION, "official")


@REWARDS.register("toy-geneval-strict")
class ToyGenEvalStrict(_ToyGenEval):
    """The strict variant: exactly ``count`` detections per clause, ``exclude`` ignored."""

    variant = "strict"
    info = geneval_info(TOY_GENEVAL_VERSION, variant)


@REWARDS.register("toy-geneval-partial")
class ToyGenEvalPartial(_ToyGenEval):
    """The partial-credit variant: the mean of the per-clause credit terms, in [0, 1]."""

    variant = "partial"
    info = geneval_info(TOY_GENEVAL_VERSION, variant)


@REWARDS.register("toy-geneval-fit")
class ToyGenEvalFit(_ToyGenEval):
    """The official rule on detections scored by the geometric fit's soft IoU (no learned weights):
    it needs near-exact edges, so it measures how crisp the shapes are as much as whether they are right."""

    scorer = "fit"
    info = geneval_info(TOY_GENEVAL_VERSION, "official")


# ---------------------------------------------------------------- toy CLIP

CLIP_ENV = "RTDMD_TOY_CLIP"
# The versions of toy-clip and toy-fd name the shipped ToyClip: cached scores are keyed by version,
# so shipping other weights must bump both (a test holds this sha against SHA256SUMS). Scores from
# other weights (a path or $RTDMD_TOY_CLIP) belong in a run directory of their own.
# version -> the shipped weights it scores with (2: the same weights as 1, computed in float64; 3: retrained
# on toy world v2's eight coarse classes)
TOY_CLIP_SHA256 = {
    "1": "10eee5928727f8df3819105af698bf8d66d099efeffab5e5587f61f5041b6bcc",
    "2": "10eee5928727f8df3819105af698bf8d66d099efeffab5e5587f61f5041b6bcc",
    "3": "cbf7b7d12176413cd3077ab4188d8951b9db1a79a7990008714e969084a44e02",
}


def load_toy_clip(path: str | Path | None = None):
    """ToyClip from ``path``, else from ``$RTDMD_TOY_CLIP``, else the shipped ``toy_clip`` checkpoint."""

    source = path or os.environ.get(CLIP_ENV)
    if source:
        return ToyClip.load(source)
    try:
        return ToyClip.load(packaged("toy_clip"))
    except WeightsError as error:
        raise WeightsError(
            f"{error}. Train it with `rtdmd-train pretrain-clip --config toy` and ship it with "
            f"rtdmd.weights.register, or pass a checkpoint path (or set {CLIP_ENV})"
        ) from None


class _UsesToyClip:
    """ToyClip in float64: on the same images, AVX2 and AVX-512 kernels, and an Intel and an AMD CPU,
    then give the same scores (bench/perf/results/README.md), which float32 features did not."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.model = load_toy_clip(path).double()

    def _model_on(self, device: torch.device):
        if self.model.logit_scale.device != device:
            self.model = self.model.to(device)
        return self.model


@REWARDS.register("toy-clip")
class ToyClipScore(_UsesToyClip):
    """Raw cosine of ToyClip's image and text embeddings (RTDMD's CLIPScore convention: no x100, no
    clamp at 0); differentiable with respect to the images."""

    info = RewardInfo(version="3", higher_is_better=True, differentiable=True, units="raw cosine")

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
        return self._model_on(images.device)(images, list(prompts))


# ---------------------------------------------------------------- toy aesthetic

AESTHETIC_TAU_RGB = 0.1  # kernel width, RGB units in [0, 1] (about 25 of 255 levels)


def flat_colour_score(images: Tensor, tau_rgb: float = AESTHETIC_TAU_RGB) -> Tensor:
    """``10 mean_p min(1, sum_k exp(-|x_p - c_k|^2 / (2 tau^2)))`` over pixels ``p`` of ``[B, 3, H, W]``
    images in [0, 1], with ``c_k`` the 11 flat colours (the palette and the background grey).

    ``sum_k exp(-d_k^2 / (2 tau^2)) = exp(-m / (2 tau^2))`` with ``m = -2 tau^2 log sum_k exp(-d_k^2 / (2 tau^2))``,
    the log-sum-exp smooth minimum of the squared distances: the Gaussian kernel of the distance to the
    nearest flat colour, made smooth. The closest two flat colours are 0.34 apart, so on a flat pixel
    the other colours add at most 3e-3 and ``min(1, .)`` holds it at exactly 1 (zero gradient: there
    is nothing to improve); the clamp keeps the scale at 0-10.
    """

    # float64: the same score on every machine's kernels (see _UsesToyClip)
    colours = torch.tensor([*PALETTE.values(), BACKGROUND], dtype=torch.float64, device=images.device) / 255
    x = images.double().permute(0, 2, 3, 1).unsqueeze(-2)  # [B, H, W, 1, 3]
    squared = (x - colours).pow(2).sum(-1)  # [B, H, W, 11]
    kernel = torch.logsumexp(-squared / (2 * tau_rgb**2), dim=-1).exp()
    return 10 * kernel.clamp(max=1.0).flatten(1).mean(1)


@REWARDS.register("toy-aesthetic")
class ToyAesthetic:
    """How much of the image is drawn in the world's flat colours (:func:`flat_colour_score`), on the
    LAION aesthetic 0-10 scale: clean renders score about 9.9 (only anti-aliased edges fall between
    colours), pixel noise, blur and off-palette colours score lower. No weights; differentiable."""

    info = RewardInfo(
        version="2",
        higher_is_better=True,
        differentiable=True,
        units=f"0-10, flat-colour kernel tau={AESTHETIC_TAU_RGB}",
    )

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
        return flat_colour_score(images)


# ---------------------------------------------------------------- toy FD


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (divisor ``N - 1``) of ``[N, D]`` features, in float64."""
    x = features.double()
    if len(x) < 2:
        raise ValueError("a covariance needs at least 2 samples")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (len(x) - 1)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``: the squared 2-Wasserstein
    distance of two Gaussians, in float64 (``tr (S1 S2)^{1/2}`` through symmetric eigendecompositions,
    which stays real where the product's non-symmetric square root would not)."""
    mu1, mu2, sigma1, sigma2 = mu1.double(), mu2.double(), sigma1.double(), sigma2.double()
    root1 = _sqrt_psd(sigma1)
    product = root1 @ sigma2 @ root1
    cross = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * cross
    return distance.clamp(min=0)  # rounding gives about -1e-6 for identical sets


def reference_renders(prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
    """Ground truth ``[N, 3, 64, 64]`` in [0, 1]: the ``k``-th occurrence of a prompt in ``prompts`` is
    ``render(scene_for(metadata, seed_for("toy-fd", prompt, k)))``."""
    import numpy as np

    seen: dict[str, int] = {}
    pixels = []
    for prompt, m in zip(prompts, meta, strict=True):
        k = seen.get(prompt, 0)
        seen[prompt] = k + 1
        pixels.append(render(scene_for(m, seed_for("toy-fd", prompt, k))))
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255


@REWARDS.register("toy-fd")
class ToyFD(_UsesToyClip):
    """Fréchet distance between ToyClip image features (:meth:`ToyClip.image_features`) of the images
    and of ground-truth renders of the same prompts (:func:`reference_renders`): a set metric.

    Like FID, the plug-in estimate is biased upwards at small N (the sample covariances' noise adds
    to the trace term), so values are comparable only between sets of the same size N, and N should
    well exceed the feature dimension (128) for the covariance to be full rank."""

    info = RewardInfo(
        version="3",
        higher_is_better=False,
        differentiable=False,
        needs=("tag", "include"),
        units="squared distance in ToyClip feature space",
        aggregate="set",
    )

    batch_size = 256

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        model = self._model_on(images.device)
        return torch.cat(
            [model.image_features(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        )

    def set_features(
        self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]
    ) -> tuple[Tensor, Tensor]:
        """``[N, D]`` features of the images and ``[N, D]`` of their ground truth, row i for image i: a
        resampled prompt set (the claims' bootstrap) takes the same rows of both."""
        if not len(images) == len(prompts) == len(meta):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(meta)} metadata rows")
        return self.features(images), self.features(reference_renders(prompts, meta).to(images.device))

    @staticmethod
    def set_value(generated: Tensor, truth: Tensor) -> Tensor:
        """The metric of features from :meth:`set_features`: ``FD(N(mu_g, S_g), N(mu_t, S_t))``."""
        return frechet_distance(*gaussian_stats(generated), *gaussian_stats(truth)).cpu()

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor:
        return self.set_value(*self.set_features(images, prompts, meta))


__all__ = [
    "ToyAesthetic",
    "ToyClipScore",
    "ToyFD",
    "ToyGenEval",
    "ToyGenEvalFit",
    "ToyGenEvalPartial",
    "ToyGenEvalStrict",
    "detections",
    "flat_colour_score",
    "frechet_distance",
    "gaussian_stats",
    "load_toy_clip",
    "reference_renders",
]
