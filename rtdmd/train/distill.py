"""Stage 1: AC-DMD distillation, with plain DMD as the ablation arm (rtdmd_method.md §4, §6.1).

One iteration: a fake-score update every step, a generator update every
``fake_updates_per_generator`` steps (two time scales), an EMA update of the generator every step.

* Generator update (§4.2.2): random stop K, backward simulation with gradient only through the last
  executed step; the boundary sample ``x_s`` (AC-DMD: the CPS output of that step at level
  ``s = sigma_K``; DMD: its clean prediction, ``s = 0``); renoising to ``t``; teacher (CFG) and fake
  projections back to ``s`` with one shared noise draw; the normalised DMD loss.
* Fake-score update (§4.2.3-4.2.4): fresh samples, the ambient target and weighting (DMD: plain flow
  matching), plus the consistency regulariser with the two-sample estimator.

Every random draw is addressed by coordinates ``(seed, phase, step, sample, what)`` where ``sample``
is the position in the global batch, so results do not depend on the number of processes, and a
resumed run replays exactly. The official code broadcasts K, t, the rollback and the CFG scale from
rank 0; K and the CFG scale are per-step coordinates here (the same on every rank), t and the
rollback per-sample ones (the same on any world size).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rtdmd import distributed, run_dir
from rtdmd.backbones.base import Cond, build_backbone
from rtdmd.config import to_dict
from rtdmd.data import batch_indices, read_prompt_file
from rtdmd.flow.cps import cps_step
from rtdmd.losses.dmd import dmd_direction, dmd_loss
from rtdmd.seeding import randn_rows, seed_for, uniform
from rtdmd.trackers import TRACKER_KEYS
from rtdmd.train.distill_config import DistillConfig
from rtdmd.train.evaluation import evaluate, load_tasks
from rtdmd.train.fake_score import fake_loss
from rtdmd.train.loop import Schedule, run_loop
from rtdmd.train.roles import EMA, Models, Session, build_roles, ema_dtype, optimizer_step
from rtdmd.train.subinterval import sample_subinterval


def generator_loss(
    cfg: DistillConfig, models: Models, step: int, samples: list[int], cond: Cond
) -> tuple[torch.Tensor, dict[str, float]]:
    """The normalised DMD loss on the boundary sample (gradient flows into the generator's last step)."""
    sub = sample_subinterval(cfg, models, "gen", step, samples, cond, grad=True)
    lo, hi = cfg.teacher_guidance
    w = lo if lo == hi else uniform(seed_for(cfg.seed, "gen", step, "cfg"), lo, hi)
    backbone, eta = models.backbone, cfg.sampler.eta
    with torch.no_grad():
        v_real = backbone.velocity(models.teacher, sub.x_t, sub.t, cond, w)
        v_fake = backbone.velocity(models.fake_run, sub.x_t, sub.t, cond, 1.0)
        z = randn_rows(
            [seed_for(cfg.seed, "gen", step, i, "project") for i in samples], models.latent_shape, sub.x_t.device
        )
        x_real = cps_step(sub.x_t, v_real, sub.t, sub.s, eta, z)  # one shared noise draw for both projections
        x_fake = cps_step(sub.x_t, v_fake, sub.t, sub.s, eta, z)
    g = dmd_direction(sub.x_s, x_real, x_fake)
    loss = dmd_loss(sub.x_s, g)
    return loss, {"loss/generator": float(loss.detach()), "train/gen_stop": sub.stop, "train/teacher_guidance": w}


def build_session(cfg: DistillConfig, world, root, backbone=None) -> Session:
    """Build the roles on ``cfg.backbone`` (or on an already built ``backbone``, e.g. random weights
    at real size for a benchmark)."""
    backbone = backbone or build_backbone(cfg.backbone, world.device)
    built = build_roles(cfg, world, backbone)
    sigmas = built.models.sigmas
    if float(sigmas[1]) + cfg.renoise.margin >= cfg.renoise.clamp[1] and cfg.method == "ac_dmd":
        raise ValueError(
            f"sigma_1 = {float(sigmas[1]):.4f}: renoising above it would be clamped below it; raise renoise.clamp"
        )
    tasks = load_tasks(cfg.eval) if cfg.eval.every else []
    prompts = read_prompt_file(cfg.prompt_file, cfg.prompt_file_sha256) if cfg.prompt_file else list(cfg.prompts)
    records = [{"prompt": prompt} for prompt in prompts]
    ema = EMA(built.gen_params, cfg.ema_decay, dtype=ema_dtype(cfg.generator))
    return Session(cfg, world, root, built, ema, records, tasks)


def train_step(sess: Session, step: int) -> dict[str, float]:
    """One iteration: fake update; generator update every ``fake_updates_per_generator`` steps; EMA."""
    cfg, models = sess.cfg, sess.models
    batch = batch_prompts(sess, step)
    samples = list(sess.world.local_slice(cfg.batch_size))
    cond = models.backbone.encode([batch[i] for i in samples], guidance=cfg.teacher_guidance[1])
    autocast = torch.autocast(sess.world.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16")
    with autocast:
        loss, logs = fake_loss(cfg, models, step, samples, cond)
    logs["train/grad_norm_fake"] = optimizer_step(
        loss, sess.fake_params, sess.optimizers["fake"], cfg.fake.optim.grad_clip
    )
    if (step + 1) % cfg.fake_updates_per_generator == 0:
        with autocast:
            loss, gen_logs = generator_loss(cfg, models, step, samples, cond)
        logs |= gen_logs
        logs["train/grad_norm_generator"] = optimizer_step(
            loss, sess.gen_params, sess.optimizers["generator"], cfg.generator.optim.grad_clip
        )
    sess.ema.update(sess.gen_params)
    return logs


def batch_prompts(sess: Session, step: int) -> list[str]:

    indices = batch_indices(sess.cfg.seed, step, sess.cfg.batch_size, len(sess.records))
    return [sess.records[i]["prompt"] for i in indices]


def train(cfg: DistillConfig, show_progress: bool = True) -> dict:
    """Run (or resume) a distillation in ``cfg.run_dir``; returns a summary."""

    world = distributed.init(cfg.device)
    root = Path(cfg.run_dir)
    if world.is_main:
        run_dir.prepare(root, cfg, mutable=("steps", *TRACKER_KEYS))
    distributed.barrier()
    sess = build_session(cfg, world, root)
    start, seconds = run_loop(
        sess,
        Schedule(cfg.steps, cfg.eval.every, cfg.log_every, cfg.checkpoint_every),
        lambda step: train_step(sess, step),
        lambda done: evaluate(sess, done),
        status=f"distill {cfg.method}",
        status_keys=("loss/fake", "loss/generator"),
        time_key="time/step_s",
        show_progress=show_progress,
        track=cfg.log,
        config=to_dict(cfg),
    )
    return {"run_dir": str(root), "start_step": start, "steps": cfg.steps, "seconds": seconds, "world_size": world.size}
