"""Stage 2: RTDMD, the hybrid policy gradient (rtdmd_method.md §5, §6.2); ``rtdmd-train rl``.

Start from stage 1: the EMA generator LoRA and the fake-score LoRA are merged into their base
weights and fresh LoRAs attached (A ~ N(0, 1), B = 0); the teacher stays frozen, there is no
reference model. Each epoch (:mod:`rtdmd.train.rl_step`):

1. SubGRPO picks ``M`` of the stochastic steps; ``iterations_per_epoch`` K-repeat sampler iterations
   roll out ``G`` images per prompt (shared noise at the untrained stochastic steps), storing states
   and old log-probs, decoding and scoring every image with the reward mixture;
2. the fake score takes one AdamW step on the final samples (ambient DSM at ``s = 0`` + consistency);
3. group advantages over the whole epoch (all ranks);
4. the generator accumulates, per sub-batch and trained step, the clipped PPO term on the chosen
   steps and, on the deterministic final step, the AC-DMD term and reward back-propagation, then
   takes ONE optimiser step; the EMA follows.

Ablation arms are one switch, ``arm`` (:data:`ARMS`). Every random draw is addressed by
``(seed, epoch, sample, ...)`` coordinates: the same run on 1 or N processes draws the same
images, and a resumed run replays bit for bit.

The config is :class:`rtdmd.train.rl_config.RLConfig`; the outer loop (resume, evaluate, log,
checkpoint) is the one all training shares (:func:`rtdmd.train.loop.run_loop`).
"""

from __future__ import annotations

import json
from pathlib import Path

from rtdmd import distributed, run_dir
from rtdmd.config import ConfigError, to_dict
from rtdmd.files import write_text_atomic
from rtdmd.trackers import TRACKER_KEYS
from rtdmd.train.evaluation import evaluate
from rtdmd.train.loop import Schedule, run_loop
from rtdmd.train.rl_config import RLConfig
from rtdmd.train.rl_step import build_session, run_epoch, stage1_origin


def check_stage1_origin(cfg: RLConfig, root: Path) -> None:
    """Record the stage-1 weights a run starts from (``stage1.json``); refuse to resume from others."""
    origin, path = stage1_origin(cfg), root / "stage1.json"
    if path.exists() and (before := json.loads(path.read_text())) != origin:
        raise ConfigError(
            f"run directory {root} started from stage-1 weights {before}, now {origin}: "
            "use a new run_dir (or point stage1 at the original weights)"
        )
    write_text_atomic(path, json.dumps(origin, indent=1))


def train(cfg: RLConfig, show_progress: bool = True) -> dict:
    """Run (or resume) stage 2 in ``cfg.run_dir``; returns a summary."""
    world = distributed.init(cfg.device)
    root = Path(cfg.run_dir)
    if world.is_main:
        run_dir.prepare(root, cfg, mutable=("epochs", *TRACKER_KEYS))
        check_stage1_origin(cfg, root)
    distributed.barrier()
    sess = build_session(cfg, world, root)
    start, seconds = run_loop(
        sess,
        Schedule(cfg.epochs, cfg.eval.every, cfg.log_every, cfg.checkpoint_every),
        lambda epoch: run_epoch(sess, epoch),
        lambda done: evaluate(sess, done),
        status=f"rl {cfg.arm}",
        status_keys=("reward/mixture", "loss/ppo"),
        time_key="time/epoch_s",
        show_progress=show_progress,
        track=cfg.log,
        config=to_dict(cfg),
    )
    return {
        "run_dir": str(root),
        "start_epoch": start,
        "epochs": cfg.epochs,
        "seconds": seconds,
        "world_size": world.size,
    }
