"""Experiment trackers beside ``stats.jsonl``: TensorBoard, Weights & Biases and trackio, chosen in a
training config::

    log:
      trackers: [tensorboard, wandb]   # any of TRACKERS' names; [] (default) = stats.jsonl only
      project: rtdmd                   # the W&B / trackio project
      wandb_mode: offline              # offline needs no network or account; `wandb sync <dir>` uploads later

Each tracker receives every row ``stats.jsonl`` receives (the numeric values, at the same step) and, at
evaluation steps, the sample grids the evaluation writes (``eval/<suite>/step_<n>.png``). ``stats.jsonl``
stays the record: a tracker that fails to import stops the run before its first step, with the command
that installs it (``pip install 'rtdmd[trackers]'``).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from rtdmd.errors import RtdmdError
from rtdmd.registry import Registry

TRACKERS: Registry = Registry("tracker")
TRACKER_KEYS = (
    "log.trackers",
    "log.project",
    "log.wandb_mode",
)  # a resumed run may switch trackers: no number depends on them


class TrackerError(RtdmdError, ImportError):
    """A tracker asked for in the config is not installed."""


@dataclass(frozen=True)
class TrackConfig:
    trackers: tuple[str, ...] = ()
    project: str = "rtdmd"
    wandb_mode: Literal["offline", "online"] = "offline"

    def validate(self) -> None:
        for name in self.trackers:
            TRACKERS.get(name)  # an unknown name fails with the known ones
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"log.trackers names a tracker twice: {list(self.trackers)}")


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a log row (a tracker plots numbers; ``stats.jsonl`` keeps everything)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def require(module: str, tracker: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(
            f"log.trackers names {tracker}, which needs the {module.split('.')[0]} package: "
            "pip install 'rtdmd[trackers]' (or remove it from log.trackers)"
        ) from None


def run_id(root: Path) -> str:
    """A stable id per run folder, so a resumed run continues the same tracker run."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


@TRACKERS.register("tensorboard")
class TensorBoard:
    """Event files under ``<run_dir>/tensorboard/`` (``tensorboard --logdir <run_dir>/tensorboard``)."""

    module = "torch.utils.tensorboard"

    def __init__(self, root: Path, cfg: TrackConfig, config: dict) -> None:
        writer = require(self.module, "tensorboard").SummaryWriter
        self.writer = writer(log_dir=str(Path(root) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        for key, path in images.items():
            self.writer.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb")
class WandB:
    """A Weights & Biases run under ``<run_dir>/wandb/`` (offline by default: ``wandb sync`` uploads it)."""

    module = "wandb"

    def __init__(self, root: Path, cfg: TrackConfig, config: dict) -> None:
        self.wandb = require(self.module, "wandb")
        self.run = self.wandb.init(
            project=cfg.project,
            name=Path(root).name,
            id=run_id(root),
            resume="allow",
            dir=str(root),
            mode=cfg.wandb_mode,
            config=config,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(numeric(metrics), step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        self.run.log({key: self.wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


@TRACKERS.register("trackio")
class Trackio:
    """A trackio run (local by default: ``trackio show`` opens its dashboard)."""

    module = "trackio"

    def __init__(self, root: Path, cfg: TrackConfig, config: dict) -> None:
        self.trackio = require(self.module, "trackio")
        self.run = self.trackio.init(project=cfg.project, name=Path(root).name, config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.trackio.log(numeric(metrics), step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        self.trackio.log({key: self.trackio.Image(str(path)) for key, path in images.items()}, step=step)

    def close(self) -> None:
        self.trackio.finish()


def open_trackers(cfg: TrackConfig, root: Path, config: dict) -> list:
    """The configured trackers, opened (all imports checked before any is opened)."""
    for name in cfg.trackers:
        require(TRACKERS.get(name).module, name)
    return [TRACKERS.get(name)(Path(root), cfg, config) for name in cfg.trackers]
