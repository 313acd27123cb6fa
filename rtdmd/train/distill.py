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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rtdmd.backbones.base import BackboneConfig, Cond
from rtdmd.checkpoint import save_tensors
from rtdmd.distributed import Strategy
from rtdmd.flow.cps import cps_step
from rtdmd.flow.path import renoise, x0_from_velocity
from rtdmd.flow.schedules import RTDMD_TIMESTEPS, shift_static
from rtdmd.losses.ac_dmd import ambient_loss, ambient_target, consistency_loss
from rtdmd.losses.dmd import dmd_direction, dmd_loss
from rtdmd.sampling import SamplerSpec, rollout, seed_table
from rtdmd.seeding import randint, randn, randn_rows, seed_for, uniform
from rtdmd.train import run_lora
from rtdmd.train.evaluation import EvalSpec, evaluate, load_tasks
from rtdmd.train.roles import RoleSpec


@dataclass(frozen=True)
class RenoiseSpec:
    """Renoising level ``t ~ U[s + margin, 1]`` clamped to ``clamp`` (sigma units; the official
    ``U[1000 s + 10, 1000]`` clamped to [20, 980] model timesteps)."""

    margin: float = 0.01
    clamp: tuple[float, float] = (0.02, 0.98)


@dataclass(frozen=True)
class DMDLevelsSpec:
    """Plain DMD's noise levels as the official DMD trainer draws them: the fake score's from a
    logit-normal over the 1000-entry descending scheduler table (:func:`fake_table_level`), the
    generator's uniformly over indices ``index_range`` of the ascending one
    (:func:`generator_table_level`). ``table_shift`` is that table's static shift (SD3 3; FLUX,
    whose official table is unshifted, and the toy 1)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    index_range: tuple[int, int] = (20, 980)
    table_shift: float = 1.0


@dataclass(frozen=True)
class ACDMDSpec:
    """AC-DMD's fake-score objective: ambient weighting ``min(1, weight_clamp sigma_ts^2)`` (with
    ``move_scale_out``) and the consistency term ``gamma`` with rollbacks ``U{1..max}/1000``."""

    weight_clamp: float = 10.0
    move_scale_out: bool = True
    consistency_weight: float = 0.01
    consistency_max_rollback: int = 200  # model-timestep units (sigma * 1000)


@dataclass(frozen=True)
class DistillConfig:
    """Config schema of ``rtdmd-train distill`` (packaged YAMLs: ``rtdmd/configs/distill/*.yaml``)."""

    method: Literal["ac_dmd", "dmd"] = "ac_dmd"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    generator: RoleSpec = field(default_factory=RoleSpec)
    fake: RoleSpec = field(default_factory=RoleSpec)
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(num_steps=4, eta=0.9, timesteps=RTDMD_TIMESTEPS))
    teacher_guidance: tuple[float, float] = (4.5, 4.5)  # U[min, max] per generator update
    renoise: RenoiseSpec = field(default_factory=RenoiseSpec)
    ac: ACDMDSpec | None = field(default_factory=ACDMDSpec)  # null for method: dmd
    dmd_levels: DMDLevelsSpec | None = None  # method dmd: the official trainer's levels; null: `renoise`'s U[...]
    height: int = 512
    width: int = 512
    prompt_file: str = ""
    prompt_file_sha256: str = ""
    prompts: tuple[str, ...] = ()  # used when prompt_file is empty
    batch_size: int = 72  # global, over all processes
    fake_updates_per_generator: int = 10
    ema_decay: float = 0.99
    steps: int = 15000
    seed: int = 0
    precision: Literal["float32", "bfloat16"] = "bfloat16"  # autocast of the network calls
    distributed: Strategy = "ddp"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1000
    log_every: int = 10
    eval: EvalSpec = field(default_factory=EvalSpec)
    device: str = "auto"
    run_dir: str = "runs/distill"

    def validate(self) -> None:
        if (self.method == "ac_dmd") != (self.ac is not None):
            raise ValueError("method 'ac_dmd' needs an `ac` section; method 'dmd' takes `ac: null`")
        if self.dmd_levels is not None:
            lo, hi = self.dmd_levels.index_range
            if self.method != "dmd":
                raise ValueError("dmd_levels belongs to method 'dmd' (AC-DMD draws its levels from the sub-interval)")
            if not 0 <= lo <= hi <= 999 or self.dmd_levels.logit_std <= 0 or self.dmd_levels.table_shift <= 0:
                raise ValueError(
                    "dmd_levels: 0 <= index_range[0] <= index_range[1] <= 999, logit_std > 0, table_shift > 0"
                )
        if not self.prompt_file and not self.prompts:
            raise ValueError("give a prompt_file or inline prompts")
        lo, hi = self.teacher_guidance
        if not 0 < lo <= hi:
            raise ValueError(f"teacher_guidance must be 0 < min <= max, got {self.teacher_guidance}")
        if min(self.steps, self.batch_size, self.fake_updates_per_generator, self.checkpoint_every, self.log_every) < 1:
            raise ValueError(
                "steps, batch_size, fake_updates_per_generator, checkpoint_every and log_every must be >= 1"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must lie in [0, 1)")


@dataclass
class SubInterval:
    """A generator sample and its renoised version: ``x_s`` at level ``s`` (one per batch, from the
    common stop K), ``x_t = a x_s + sigma_ts eps`` at per-sample levels ``t``."""

    stop: int
    x_s: torch.Tensor
    s: float
    t: torch.Tensor
    eps: torch.Tensor
    x_t: torch.Tensor


@dataclass
class Models:
    """What the update functions need; ``generator_run`` / ``fake_run`` are the (DDP-)wrapped
    modules used for training forwards."""

    backbone: object
    teacher: torch.nn.Module
    generator_run: torch.nn.Module
    fake_run: torch.nn.Module
    sigmas: torch.Tensor
    latent_shape: tuple[int, int, int]


def renoise_levels(spec: RenoiseSpec, s: float, seeds: list[int]) -> torch.Tensor:
    """Per-sample ``t = clamp(s + margin + u (1 - s - margin), *clamp)``, ``u ~ U[0, 1)`` from each seed."""
    lo = s + spec.margin
    t = [lo + uniform(seed) * (1 - lo) for seed in seeds]
    return torch.tensor(t, dtype=torch.float32).clamp(*spec.clamp)


def fake_table_level(z: float, spec: DMDLevelsSpec) -> float:
    """``sigma = shift(1 - i / 1000)`` with ``i = min(floor(1000 sigmoid(m + s z)), 999)``: entry ``i``
    of the descending 1000-entry table picked by a logit-normal draw (``z ~ N(0, 1)``)."""
    u = 1 / (1 + math.exp(-(spec.logit_mean + spec.logit_std * z)))
    index = min(math.floor(1000 * u), 999)
    return float(shift_static(1 - index / 1000, spec.table_shift))


def generator_table_level(index: int, spec: DMDLevelsSpec) -> float:
    """``sigma = shift((i + 1) / 1000)``: entry ``i`` of the ascending 1000-entry table."""
    return float(shift_static((index + 1) / 1000, spec.table_shift))


def draw_renoise_levels(cfg: DistillConfig, phase: str, step: int, samples: list[int], s: float) -> torch.Tensor:
    """Per-sample renoising levels: :func:`renoise_levels`, or for plain DMD with ``dmd_levels`` the
    official draws (the fake phase's from :func:`fake_table_level`, the generator's from
    :func:`generator_table_level`)."""
    seeds = [seed_for(cfg.seed, phase, step, i, "t") for i in samples]
    spec = cfg.dmd_levels
    if spec is None:
        return renoise_levels(cfg.renoise, s, seeds)
    if phase == "fake":
        levels = [fake_table_level(float(randn(seed, ())), spec) for seed in seeds]
    else:
        levels = [generator_table_level(randint(seed, *spec.index_range), spec) for seed in seeds]
    return torch.tensor(levels, dtype=torch.float32)


def sample_subinterval(
    cfg: DistillConfig, models: Models, phase: str, step: int, samples: list[int], cond: Cond, grad: bool
) -> SubInterval:
    """Backward simulation to a random stop K and the boundary/renoised pair (§4.2.1)."""
    num_steps = len(models.sigmas) - 1
    stop = randint(seed_for(cfg.seed, phase, step, "stop"), 1, num_steps)
    seeds = seed_table(cfg.seed, [(f"{phase}/{step}", i) for i in samples], num_steps)
    traj = rollout(
        models.backbone,
        models.generator_run,
        cond,
        models.sigmas,
        seeds,
        models.latent_shape,
        eta=cfg.sampler.eta,
        record=False,
        stop=stop,
        grad_last=grad,
    )
    if cfg.method == "ac_dmd":  # the CPS output of the last executed step, at s = sigma_K
        x_s, s = traj.final, float(models.sigmas[stop])
    else:  # plain DMD: the clean prediction of the last executed step
        x_s, s = x0_from_velocity(traj.last_input, traj.last_velocity, float(models.sigmas[stop - 1])), 0.0
    device = x_s.device
    t = draw_renoise_levels(cfg, phase, step, samples, s).to(device)
    eps = randn_rows([seed_for(cfg.seed, phase, step, i, "renoise") for i in samples], models.latent_shape, device)
    x_t = renoise(x_s.detach().float(), s, t, eps)
    return SubInterval(stop=stop, x_s=x_s, s=s, t=t, eps=eps, x_t=x_t)


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


def fake_loss(
    cfg: DistillConfig, models: Models, step: int, samples: list[int], cond: Cond
) -> tuple[torch.Tensor, dict[str, float]]:
    """Ambient DSM (or plain flow matching) plus the consistency regulariser, on fresh samples."""
    with torch.no_grad():
        sub = sample_subinterval(cfg, models, "fake", step, samples, cond, grad=False)
    backbone, ac = models.backbone, cfg.ac
    v = backbone.velocity(models.fake_run, sub.x_t, sub.t, cond, 1.0)
    target = ambient_target(sub.x_s.float(), sub.eps, sub.s, sub.t)
    if ac is None:  # plain DMD: standard flow-matching loss, no consistency
        loss = ambient_loss(v, target, sub.s, sub.t, move_scale_out=False)
        return loss, {"loss/fake": float(loss.detach()), "train/fake_stop": sub.stop}
    loss_amb = ambient_loss(v, target, sub.s, sub.t, ac.weight_clamp, ac.move_scale_out)
    logs = {"loss/fake_ambient": float(loss_amb.detach()), "train/fake_stop": sub.stop}
    loss = loss_amb
    if ac.consistency_weight:
        loss_cons = consistency_term(
            models,
            sub.x_t,
            sub.t,
            v,
            cond,
            cfg.sampler.eta,
            ac.consistency_max_rollback,
            samples,
            lambda i, *what: seed_for(cfg.seed, "fake", step, i, *what),
        )
        loss = loss + ac.consistency_weight * loss_cons
        logs["loss/fake_consistency"] = float(loss_cons.detach())
    logs["loss/fake"] = float(loss.detach())
    return loss, logs


def consistency_term(
    models: Models,
    x_t: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    cond: Cond,
    eta: float,
    max_rollback: int,
    samples: list[int],
    seed_of: Callable[..., int],
) -> torch.Tensor:
    """``mean((h'_1 - h_a)(h'_2 - h_a))``: two independent stop-gradient CPS moves ``t -> t'`` with the
    fake's own (detached) velocity; the gradient reaches the fake through ``h_a``, ``h'_1``, ``h'_2``.

    ``seed_of(i, *what)`` addresses sample ``i``'s draws: the rollback ``t - t' ~ U{1..max}/1000``
    and the two moves' noises."""
    device = x_t.device
    rollback = [randint(seed_of(i, "rollback"), 1, max_rollback) for i in samples]
    t_prev = (t - torch.tensor(rollback, device=device, dtype=torch.float32) / 1000).clamp(min=0)
    anchor = x0_from_velocity(x_t, v.float(), t)
    with torch.no_grad():
        moves = [
            cps_step(
                x_t,
                v.detach(),
                t,
                t_prev,
                eta,
                randn_rows([seed_of(i, "consistency", j) for i in samples], models.latent_shape, device),
            )
            for j in (1, 2)
        ]
    x_both, t_both = torch.cat(moves), torch.cat([t_prev, t_prev])
    both = cond.select(list(range(len(samples))) * 2)
    v_both = models.backbone.velocity(models.fake_run, x_both, t_both, both, 1.0)
    h_1, h_2 = x0_from_velocity(x_both, v_both.float(), t_both).chunk(2)
    return consistency_loss(h_1, h_2, anchor)


# ---------------------------------------------------------------- setup and loop


@dataclass
class Session:
    """Built once per process: models, optimisers, EMA, prompts, logging."""

    cfg: DistillConfig
    world: object
    root: object
    models: Models
    generator: torch.nn.Module  # unwrapped, for evaluation and parameter names
    gen_params: dict
    fake_params: dict
    optimizers: dict
    roles: dict
    ema: object
    prompts: list[str]
    eval_tasks: list  # the evaluation suites, loaded once (rtdmd.train.evaluation.EvalTask)


@dataclass
class BuiltRoles:
    """The trainable roles of a stage (generator and fake score), their optimisers and the models
    the losses call; stage 1 and stage 2 build them with :func:`build_roles`."""

    models: Models
    generator: torch.nn.Module  # unwrapped
    gen_params: dict
    fake_params: dict
    optimizers: dict

    @property
    def roles(self) -> dict:
        return {
            "generator": (self.models.generator_run, self.optimizers["generator"]),
            "fake": (self.models.fake_run, self.optimizers["fake"]),
        }


def build_roles(
    cfg, world, backbone, merges: dict[str, list[Callable]] | None = None, seed_scope: str = ""
) -> BuiltRoles:
    """The frozen teacher (the backbone's transformer), and the generator and fake score: each a copy
    of the teacher (or of its role's ``source``), each of ``merges[role]`` applied (stage 2 folds stage 1's
    LoRAs in), made trainable (LoRA seeded by ``seed_scope + role``), wrapped for DDP/FSDP, with AdamW.
    ``cfg`` carries ``generator``, ``fake``, ``seed``, ``gradient_checkpointing``, ``distributed``,
    ``sampler``, ``height`` and ``width``."""
    import copy

    from rtdmd.distributed import wrap
    from rtdmd.train.roles import adamw, load_transformer_like, make_trainable, trainable

    teacher = backbone.transformer.eval().requires_grad_(False)

    def role(name: str) -> torch.nn.Module:
        spec: RoleSpec = getattr(cfg, name)
        base = load_transformer_like(teacher, spec.source) if spec.source else copy.deepcopy(teacher)
        for merge in (merges or {}).get(name, []):
            merge(base)
        net = make_trainable(base, spec, backbone.lora_targets, cfg.seed, seed_scope + name).train()
        if cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        return net

    generator, fake = role("generator"), role("fake")
    generator_run, fake_run = wrap(generator, cfg.distributed, world), wrap(fake, cfg.distributed, world)
    gen_params, fake_params = trainable(generator), trainable(fake)  # after wrapping: FSDP2 shards in place
    optimizers = {"generator": adamw(gen_params, cfg.generator.optim), "fake": adamw(fake_params, cfg.fake.optim)}
    sigmas = backbone.schedule(cfg.sampler.num_steps, cfg.height, cfg.width, cfg.sampler.timesteps)
    models = Models(backbone, teacher, generator_run, fake_run, sigmas, backbone.latent_shape(cfg.height, cfg.width))
    return BuiltRoles(models, generator, gen_params, fake_params, optimizers)


def build_session(cfg: DistillConfig, world, root, backbone=None) -> Session:
    """Build the roles on ``cfg.backbone`` (or on an already built ``backbone``, e.g. random weights
    at real size for a benchmark)."""
    from rtdmd.backbones.base import build_backbone
    from rtdmd.train.roles import EMA, ema_dtype

    backbone = backbone or build_backbone(cfg.backbone, world.device)
    built = build_roles(cfg, world, backbone)
    sigmas = built.models.sigmas
    if float(sigmas[1]) + cfg.renoise.margin >= cfg.renoise.clamp[1] and cfg.method == "ac_dmd":
        raise ValueError(
            f"sigma_1 = {float(sigmas[1]):.4f}: renoising above it would be clamped below it; raise renoise.clamp"
        )
    tasks = load_tasks(cfg.eval) if cfg.eval.every else []
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        from rtdmd.data import read_prompt_file

        prompts = read_prompt_file(cfg.prompt_file, cfg.prompt_file_sha256)
    return Session(
        cfg=cfg,
        world=world,
        root=root,
        models=built.models,
        generator=built.generator,
        gen_params=built.gen_params,
        fake_params=built.fake_params,
        optimizers=built.optimizers,
        roles=built.roles,
        ema=EMA(built.gen_params, cfg.ema_decay, dtype=ema_dtype(cfg.generator)),
        prompts=prompts,
        eval_tasks=tasks,
    )


def optimizer_step(loss: torch.Tensor, params: dict, optimizer: torch.optim.Optimizer, clip: float) -> float:
    """Backward, then :func:`clip_and_step`; returns the pre-clip gradient norm."""
    loss.backward()
    return clip_and_step(params, optimizer, clip)


def clip_and_step(params: dict, optimizer: torch.optim.Optimizer, clip: float) -> float:
    """Global-norm clipping of the accumulated gradients (0 = off), AdamW step, zeroed gradients;
    returns the pre-clip gradient norm."""
    grads = [p for p in params.values() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(grads, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


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
    from rtdmd.data import batch_indices

    return [sess.prompts[i] for i in batch_indices(sess.cfg.seed, step, sess.cfg.batch_size, len(sess.prompts))]


def train(cfg: DistillConfig, show_progress: bool = True) -> dict:
    """Run (or resume) a distillation in ``cfg.run_dir``; returns a summary."""
    from pathlib import Path

    from rtdmd import distributed, run_dir
    from rtdmd.train.loop import Schedule, run_loop

    world = distributed.init(cfg.device)
    root = Path(cfg.run_dir)
    if world.is_main:
        run_dir.prepare(root, cfg, mutable=("steps",))
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
    )
    return {"run_dir": str(root), "start_step": start, "steps": cfg.steps, "seconds": seconds, "world_size": world.size}


def export_generator_lora(
    run: str | Path, path: str | Path, dtype: torch.dtype = torch.float16, allow_partial: bool = False, **meta: str
) -> Path:
    """The EMA generator LoRA of a finished ``distill`` or ``rl`` run (its last checkpoint; an
    unfinished run only with ``allow_partial``) as a peft-named safetensors file in ``dtype``; the
    metadata holds ``lora_rank``, ``lora_alpha``, the step and the run's method (or RL arm). A
    stage-2 run's file is its own LoRA: it applies on top of its stage 1."""
    found = run_lora.read_run(run)
    if not found.finished and not allow_partial:
        raise run_lora.RunError(
            f"{found.run} stopped at step {found.step} of {found.total}: finish it, or pass --allow-partial"
        )
    tensors = found.tensors("generator", dtype)  # refuses a run whose generator trained every weight
    lora = found.config["generator"]["lora"]
    info = {"lora_rank": str(lora["rank"]), "lora_alpha": str(float(lora["alpha"]))}
    return save_tensors(tensors, path, metadata={**meta, "step": str(found.step), "method": found.method, **info})
