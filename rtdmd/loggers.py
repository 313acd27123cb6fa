"""Metric logging: a JSON-lines file (always) and a rich status line on the console.

Keys are namespaced (``train/``, ``loss/``, ``reward/``, ``time/``, ``mem/``). Only rank 0 logs;
other ranks get a :class:`NullLogger`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rtdmd.files import JsonLinesAppender


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible
    return value


def _short(value: Any) -> str:
    value = _jsonable(value)
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)  # "nan" stays readable


class JsonlLogger:
    """Appends one ``{"step": ..., "time": ..., **metrics}`` line per call, durably (:mod:`rtdmd.files`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = JsonLinesAppender(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.append(
            [{"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}]
        )

    def close(self) -> None:
        self._file.close()


class StatusLine:
    """A rich progress bar whose description shows the latest key metrics and peak GPU memory."""

    def __init__(self, total: int, description: str = "", keys: tuple[str, ...] = (), console: Console | None = None):
        self.keys = keys
        self.description = description
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, status="")
        self._progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        shown = [f"{k.split('/')[-1]}={_short(metrics[k])}" for k in self.keys if k in metrics]
        if torch.cuda.is_available():
            shown.append(f"mem={torch.cuda.max_memory_allocated() / 2**30:.1f}GiB")
        self._progress.update(self._task, completed=step, status=" ".join(shown))

    def close(self) -> None:
        self._progress.stop()


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class Loggers:
    """Fan-out to several loggers."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
