"""The outer loop that stage 1 and stage 2 share: resume, step, evaluate, log, checkpoint.

A session (:class:`rtdmd.train.distill.Session`, :class:`rtdmd.train.rl_step.Session`) brings
``roles``, ``ema``, ``world`` and ``root``; the caller brings one step (a stage-1 iteration or a
stage-2 epoch) and the evaluation. Logs are reduced over all processes; rank 0 alone writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rtdmd import distributed, run_dir
from rtdmd.errors import kill_point
from rtdmd.loggers import JsonlLogger, Loggers, NullLogger, StatusLine
from rtdmd.trackers import TrackConfig, open_trackers
from rtdmd.train import state


@dataclass
class LoopSession:
    """The four things :func:`run_loop` reads from a session; trainers with one role and no EMA
    (ToyClip, the recogniser) build just this (``EMA({}, 0.0)``: nothing to average)."""

    world: object
    root: Path
    roles: dict
    ema: object


@dataclass(frozen=True)
class Schedule:
    """How many steps, and every how many to evaluate (0 = never), log and checkpoint."""

    total: int
    eval_every: int
    log_every: int
    checkpoint_every: int


def run_loop(
    sess,
    schedule: Schedule,
    step: Callable[[int], dict[str, float]],
    evaluate: Callable[[int], dict[str, float]],
    *,
    status: str,
    status_keys: tuple[str, ...],
    time_key: str,
    show_progress: bool = True,
    track: TrackConfig | None = None,
    config: dict | None = None,
) -> tuple[int, float]:
    """Run steps ``start..total - 1`` (``start`` from the latest checkpoint); returns ``(start, seconds)``.
    ``track``: the trackers (:mod:`rtdmd.trackers`) that receive every logged row and the evaluation's
    sample grids beside ``stats.jsonl``; ``config`` is what they record as the run's config."""

    world, root = sess.world, sess.root
    with run_dir.exclusive(root, world.is_main):  # a second trainer on this run_dir stops here
        start = state.resume(root, sess.roles, sess.ema, world.is_main)
        loggers, trackers = NullLogger(), []
        if world.is_main:
            trackers = open_trackers(track, root, config or {}) if track else []
            bars = [StatusLine(schedule.total, status, status_keys)] if show_progress else []
            loggers = Loggers(JsonlLogger(root / "stats.jsonl"), *trackers, *bars)
            bars and bars[0].log(start, {})
        t_start = time.perf_counter()
        for index in range(start, schedule.total):
            t0 = time.perf_counter()
            logs = step(index)
            done = index + 1
            evaluated = bool(schedule.eval_every) and done % schedule.eval_every == 0
            if evaluated:
                logs |= evaluate(done)
            if evaluated or done % schedule.log_every == 0 or done == schedule.total:  # an evaluation is never dropped
                logs = distributed.reduce_logs(logs)
                logs[time_key] = time.perf_counter() - t0
                if torch.cuda.is_available():
                    logs["mem/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                loggers.log(done, logs)
                if evaluated and trackers:
                    grids = {f"samples/{p.parent.name}": p for p in sorted(root.glob(f"eval/*/step_{done:08d}.png"))}
                    for tracker in trackers:
                        tracker.log_images(done, grids)
                kill_point("train-logged")
            if done % schedule.checkpoint_every == 0 or done == schedule.total:
                state.save(state.checkpoint_path(root, done), done, sess.roles, sess.ema, world.is_main)
                distributed.barrier()
                kill_point("train-checkpoint")
        loggers.close()
    distributed.shutdown()
    return start, time.perf_counter() - t_start
