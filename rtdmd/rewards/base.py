"""The Reward contract.

A reward maps float images ``[B, 3, H, W]`` in [0, 1], their prompts and per-prompt metadata to
scores ``[B]`` in the metric's published units. The differentiable path is the only path; no-grad
and chunking are wrappers (:func:`score`). ``info`` declares version, direction, differentiability
and the metadata keys the reward needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from rtdmd.errors import RtdmdError
from rtdmd.registry import Registry


@dataclass(frozen=True)
class RewardInfo:
    """What a score means. ``units`` states the scale as reported (e.g. "raw cosine", "x100");
    ``aggregate``: ``mean`` over prompts, ``category_mean`` (the mean of per-category means,
    GenEval's task-averaged overall score), or ``set``: a distribution metric (e.g. a Fréchet
    distance) that scores a whole set of images at once, see :class:`SetMetric`."""

    version: str
    higher_is_better: bool
    differentiable: bool
    needs: tuple[str, ...] = ()  # metadata keys each prompt must carry
    units: str = ""
    aggregate: Literal["mean", "category_mean", "set"] = "mean"


@runtime_checkable
class Reward(Protocol):
    info: ClassVar[RewardInfo]

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor: ...


@runtime_checkable
class SetMetric(Protocol):
    """A metric of a whole set (``info.aggregate == "set"``): one scalar for all images of a run,
    registered in :data:`REWARDS` like the per-image rewards."""

    info: ClassVar[RewardInfo]

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]) -> Tensor: ...


@runtime_checkable
class ResamplableSetMetric(SetMetric, Protocol):
    """A set metric computed from per-image rows (``set_features``: row i of each returned tensor
    belongs to image i) by ``set_value``: a bootstrap over prompts resamples the rows instead of
    scoring the images again (:mod:`bench.claim_stats`)."""

    def set_features(
        self, images: Tensor, prompts: Sequence[str], meta: Sequence[dict[str, Any]]
    ) -> tuple[Tensor, ...]: ...

    def set_value(self, *rows: Tensor) -> Tensor: ...


TOY_METRICS = (
    "toy-geneval",
    "toy-geneval-strict",
    "toy-geneval-partial",
    "toy-geneval-fit",
    "toy-clip",
    "toy-aesthetic",
    "toy-fd",
)
REWARDS: Registry[type] = Registry("reward", lazy=dict.fromkeys(TOY_METRICS, "rtdmd.toyworld.rewards"))


@torch.no_grad()
def score(
    reward: Reward,
    images: Tensor,
    prompts: Sequence[str],
    meta: Sequence[dict[str, Any]] | None = None,
    batch_size: int = 16,
) -> Tensor:
    """Scores ``[N]`` (float32, CPU) without gradient, in chunks of ``batch_size`` images."""
    if reward.info.aggregate == "set":
        raise ValueError(f"{type(reward).__name__} scores a whole set at once; call it on all images, not in chunks")
    meta = list(meta) if meta is not None else [{} for _ in prompts]
    out = [
        reward(images[i : i + batch_size], prompts[i : i + batch_size], meta[i : i + batch_size]).float().cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def lacking_metadata(info: RewardInfo, meta: Sequence[dict[str, Any]]) -> dict[str, int]:
    """``{key: rows without it}`` for each metadata key ``info.needs`` that some row lacks."""
    counts = {key: sum(key not in row for row in meta) for key in info.needs}
    return {key: n for key, n in counts.items() if n}


class MissingMetadata(RtdmdError, ValueError):
    """Prompts that lack the metadata a metric needs (GenEval's ``include`` and ``tag``, ...)."""


def require_metadata(names: Sequence[str], meta: Sequence[dict[str, Any]], where: str, unit: str = "prompts") -> None:
    """Refuse the first metric of ``names`` whose ``info.needs`` some row of ``meta`` lacks, naming the
    key, how many rows lack it and ``where`` the rows come from (e.g. ``suite geneval``). Checked
    before any image is made or any scorer is loaded."""
    for name in names:
        if lacking := lacking_metadata(REWARDS.get(name).info, meta):
            key, count = next(iter(lacking.items()))
            raise MissingMetadata(
                f"metric {name} needs per-prompt metadata {key!r}, which {where} lacks ({count} of {len(meta)} {unit}); "
                'a .jsonl prompt file gives it as keys beside "prompt" (GenEval\'s layout) or in a "metadata" object'
            )


def require_per_image(names: Sequence[str], key: str) -> None:
    """Refuse unknown rewards and set metrics where each image is scored on its own (a training
    evaluation: a Fréchet distance of a few eval images means nothing)."""
    for name in names:
        if REWARDS.get(name).info.aggregate == "set":
            raise ValueError(f"{key}: {name} scores whole sets; evaluate it with rtdmd-bench instead")


class OnDevice:
    """A frozen scoring network that follows the images: moved (once per change) to the device of
    the batch it scores, in the reward's ``dtype``; eval mode, no parameter requires grad, so
    gradients flow to the images only."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
        self.module = module.to(dtype=dtype).eval().requires_grad_(False)
        self.dtype = dtype

    def on(self, device: torch.device) -> torch.nn.Module:
        if next(self.module.parameters()).device != device:
            self.module = self.module.to(device)
        return self.module


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
