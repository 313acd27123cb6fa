"""One stage-2 epoch (rtdmd_method.md §5.2-5.6): rollouts, fake-score step, advantages, generator step.

Sub-batches of the generator update are the sampler iterations' own batches, in rollout order: the
update accumulates every sub-batch before its single optimiser step, so the order does not change
the gradient, and recomputing a velocity on the batch it was rolled out with reproduces the
rollout's numbers exactly (same shapes, same kernels), so at ``theta = theta_old`` the PPO ratio is
exactly 1 instead of 1 plus rounding noise (which the exact log-density would amplify by
``N / rho^2``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rtdmd.backbones.base import Cond, build_backbone
from rtdmd.data import read_prompt_records
from rtdmd.distributed import mean_across
from rtdmd.flow.cps import cps_mean_std, gaussian_log_prob, simplified_log_prob
from rtdmd.flow.path import renoise, x0_from_velocity
from rtdmd.lora import resolve_lora_file
from rtdmd.losses.ac_dmd import ambient_loss, ambient_target
from rtdmd.losses.dmd import dmd_direction, dmd_loss
from rtdmd.losses.grpo import group_advantages, ppo_clipped_loss, reward_hinge
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import require_metadata
from rtdmd.sampling import rollout
from rtdmd.seeding import randn_rows, seed_for, uniform
from rtdmd.train import run_lora, state
from rtdmd.train.evaluation import load_tasks
from rtdmd.train.fake_score import consistency_term
from rtdmd.train.rl_config import RLConfig, trained_steps
from rtdmd.train.rl_plan import k_repeat_batch, noise_seeds
from rtdmd.train.roles import EMA, Session, build_roles, clip_and_step, ema_dtype, warmup_decay
from rtdmd.train.subinterval import renoise_levels
from rtdmd.weights import sha256_of


@dataclass
class Batch:
    """One sampler iteration's local rows, as rolled out."""

    samples: list[int]  # index of each image in the epoch (global over ranks)
    prompt_ids: list[int]
    cond: Cond
    states: Tensor  # [B, T + 1, C, h, w]
    log_probs: Tensor  # [B, T], the configured form, at theta_old
    rewards: dict[str, Tensor]  # name -> [B] float64


# ---------------------------------------------------------------- building


def stage1_origin(cfg: RLConfig) -> dict[str, str]:
    """What stage 2 starts from, precisely: the stage-1 checkpoint file, or each LoRA file with its
    sha256 (a resumed run must start from the same weights: stage 1 may have gone on meanwhile)."""

    spec = cfg.stage1
    if spec.run:
        latest = state.latest_checkpoint(Path(spec.run))
        return {"run_checkpoint": str(latest[1].resolve()) if latest else ""}
    return {
        role: f"{source} sha256 {sha256_of(resolve_lora_file(source))}"
        for role, source in (("generator", spec.generator_lora), ("fake", spec.fake_lora))
        if source
    }


def stage1_merges(cfg: RLConfig) -> dict[str, list[Callable[[nn.Module], int]]]:
    """``{role: merges}``: what folds stage 1 into a copy of the base weights for ``role``: a stage-1
    run directory's EMA generator and fake LoRAs, or LoRA files (:mod:`rtdmd.train.run_lora`); a
    role without any is absent."""
    spec = asdict(cfg.stage1)
    return {role: merges for role in ("generator", "fake") if (merges := run_lora.stage1_merges(spec, role))}


def build_session(cfg: RLConfig, world, root: Path, backbone=None, rewards: dict | None = None) -> Session:
    """Roles from stage 1 (merged LoRA + fresh LoRA), optimisers, the stage-2 EMA, prompts, rewards.
    ``backbone`` / ``rewards`` may be given already built (e.g. random weights for a benchmark)."""

    backbone = backbone or build_backbone(cfg.backbone, world.device)
    built = build_roles(cfg, world, backbone, stage1_merges(cfg), seed_scope="rl-")
    if cfg.prompt_file:
        records = read_prompt_records(cfg.prompt_file, cfg.prompt_file_sha256)
    else:
        records = [{"prompt": p} for p in cfg.prompts]
    require_metadata([t.name for t in cfg.rewards], records, f"prompt file {cfg.prompt_file or '(the inline prompts)'}")
    scorers = dict(rewards or {})
    for term in cfg.rewards:
        if term.name not in scorers:
            scorers[term.name] = REWARDS.get(term.name)(**term.options)
    tasks = load_tasks(cfg.eval) if cfg.eval.every else []
    ema = EMA(built.gen_params, cfg.ema.decay, dtype=ema_dtype(cfg.generator))
    return Session(cfg, world, root, built, ema, records, tasks, scorers)


# ---------------------------------------------------------------- the epoch


def autocast(sess: Session):
    return torch.autocast(sess.world.device.type, dtype=torch.bfloat16, enabled=sess.cfg.precision == "bfloat16")


@contextlib.contextmanager
def grad_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate locally (no all-reduce) unless ``enabled``: DDP's ``no_sync``, FSDP2's switch."""
    if hasattr(net, "no_sync") and not enabled:
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


@torch.no_grad()
def rollout_batch(sess: Session, epoch: int, iteration: int, trained: tuple[int, ...]) -> Batch:
    """Sampler iteration ``iteration``: this rank's rows, rolled out, decoded and scored."""

    cfg, models = sess.cfg, sess.models
    prompt_ids = k_repeat_batch(cfg.seed, epoch, iteration, len(sess.records), cfg.batch_size, cfg.grpo.group_size)
    local = list(sess.world.local_slice(cfg.batch_size))
    samples = [iteration * cfg.batch_size + i for i in local]
    ids = [prompt_ids[i] for i in local]
    prompts = [sess.records[i]["prompt"] for i in ids]
    num_steps = cfg.sampler.num_steps
    stochastic = range(num_steps - 1)  # the last step lands on sigma = 0: deterministic
    own = trained if cfg.terms.subgrpo else tuple(stochastic)  # without SubGRPO no noise is shared
    seeds = [
        noise_seeds(cfg.seed, epoch, s, p, stochastic, own, num_steps) for s, p in zip(samples, prompts, strict=True)
    ]
    cond = models.backbone.encode(prompts, guidance=cfg.teacher_guidance[1])
    with autocast(sess):
        traj = rollout(
            models.backbone, models.generator_run, cond, models.sigmas, seeds, models.latent_shape, eta=cfg.sampler.eta
        )
        images = models.backbone.decode(traj.final).float().clamp(0, 1)
    meta = [sess.records[i] for i in ids]
    rewards = {t.name: sess.rewards[t.name](images, prompts, meta).double().cpu() for t in scored_rewards(sess)}
    log_probs = traj.log_probs if cfg.grpo.log_prob == "exact" else traj.log_probs_simplified
    return Batch(samples, ids, cond, traj.states.detach(), log_probs.detach(), rewards)


def scored_rewards(sess: Session) -> list:
    """The rewards each rollout is scored with: all of the mixture for a policy gradient; without
    one only the back-propagated ones are logged (a GenEval detector costs more than the rest)."""
    cfg = sess.cfg
    if cfg.terms.ppo:
        return list(cfg.rewards)
    return [t for t in cfg.rewards if sess.rewards[t.name].info.differentiable]


def epoch_advantages(sess: Session, batches: list[Batch]) -> tuple[list[Tensor], dict[str, float]]:
    """Group advantages over every image of the epoch on every rank; this rank's, per batch."""
    import torch.distributed as dist

    terms = scored_rewards(sess)
    local = {
        "samples": [s for b in batches for s in b.samples],
        "groups": [g for b in batches for g in b.prompt_ids],
        "rewards": {t.name: torch.cat([b.rewards[t.name] for b in batches]) for t in terms},
    }
    parts = [local]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    samples = [s for p in parts for s in p["samples"]]
    order = sorted(range(len(samples)), key=samples.__getitem__)  # global sample order: any world size
    groups = [g for p in parts for g in p["groups"]]
    groups = [groups[i] for i in order]
    rewards = {t.name: torch.cat([p["rewards"][t.name] for p in parts])[order] for t in terms}
    adv = group_advantages(rewards, {t.name: t.weight for t in terms}, groups)
    by_sample = dict(zip([samples[i] for i in order], adv.tolist(), strict=True))
    mixture = sum(t.weight * rewards[t.name] for t in terms)
    logs = {f"reward/{name}": float(r.mean()) for name, r in rewards.items()}
    logs |= {"reward/mixture": float(mixture.mean()), "adv/zero_fraction": float((adv == 0).double().mean())}
    members: dict[int, list[int]] = {}
    for position, group in enumerate(groups):
        members.setdefault(group, []).append(position)
    logs["reward/group_std"] = float(torch.tensor([mixture[members[g]].std() for g in sorted(members)]).mean())
    return [torch.tensor([by_sample[s] for s in b.samples], dtype=torch.float64) for b in batches], logs


def fake_update(sess: Session, epoch: int, batches: list[Batch]) -> dict[str, float]:
    """ONE AdamW step of the fake score on the epoch's final samples (``s = 0``): ambient DSM
    (flow matching weighted by ``min(1, c t^2)``) plus the consistency term (§5.6)."""

    cfg, models = sess.cfg, sess.models
    obj = cfg.fake_objective
    total = sum(len(b.samples) for b in batches)
    chunks = [(b, rows) for b in batches for rows in _chunks(len(b.samples), cfg.fake_chunk or len(b.samples))]
    sums = {"loss/fake": 0.0, "loss/fake_consistency": 0.0}
    for n, (batch, rows) in enumerate(chunks):
        samples = [batch.samples[i] for i in rows]
        x0 = batch.states[rows, -1].float()
        device = x0.device
        t = renoise_levels(cfg.renoise, 0.0, [seed_for(cfg.seed, "rl-fake", epoch, i, "t") for i in samples]).to(device)
        eps = randn_rows(
            [seed_for(cfg.seed, "rl-fake", epoch, i, "renoise") for i in samples], models.latent_shape, device
        )
        x_t = renoise(x0, 0.0, t, eps)
        cond = batch.cond.select(rows)
        with grad_sync(models.fake_run, n == len(chunks) - 1), autocast(sess):
            v = models.backbone.velocity(models.fake_run, x_t, t, cond, 1.0)
            loss = ambient_loss(v, ambient_target(x0, eps, 0.0, t), 0.0, t, obj.weight_clamp, obj.move_scale_out)
            if obj.consistency_weight:
                cons = consistency_term(
                    models,
                    x_t,
                    t,
                    v,
                    cond,
                    cfg.sampler.eta,
                    obj.consistency_max_rollback,
                    samples,
                    lambda i, *what: seed_for(cfg.seed, "rl-fake", epoch, i, *what),
                )
                sums["loss/fake_consistency"] += float(cons.detach()) * len(rows) / total
                loss = loss + obj.consistency_weight * cons
            (loss * len(rows) / total).backward()
        sums["loss/fake"] += float(loss.detach()) * len(rows) / total
    sums["train/grad_norm_fake"] = clip_and_step(sess.fake_params, sess.optimizers["fake"], cfg.fake.optim.grad_clip)
    return sums


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def kept_share(keep: Tensor) -> float:
    """``K / W``: the rows ``keep`` marks in the global sub-batch (all ranks) over the number of ranks.

    A rank's sum over its kept rows divided by ``K / W``, averaged over the ranks as DDP and FSDP
    average gradients, is ``sum over all kept rows / K``: the single-process mean on any world size.
    Dividing by the rank's own count instead weights each rank's rows by ``1 / its count``, which
    differs as soon as zero advantages fall unevenly (a GenEval group whose images all score alike).
    A collective: every rank calls it at the same point. 1 when no row is kept (every term is 0)."""
    share = float(mean_across(keep.double().sum()))
    return share if share > 0 else 1.0


def final_step_loss(
    sess: Session, epoch: int, batch: Batch, keep: Tensor, x0: Tensor, w: float
) -> tuple[Tensor, dict[str, float]]:
    """The deterministic final step's terms on the clean prediction ``x0`` (which carries the
    generator's graph): ``dm.weight x`` the DMD loss (teacher CFG ``w`` vs fake, renoised to
    per-sample ``t``, ``s = 0``) and the reward back-propagation, as one differentiable scalar,
    each a mean over the rows ``keep`` marks in the global sub-batch (:func:`kept_share`; every row is
    computed: all ranks run the same calls)."""
    cfg, models = sess.cfg, sess.models
    terms, logs = cfg.terms, {}
    kept = kept_share(keep)
    loss = x0.new_zeros((), dtype=torch.float64)
    if terms.dm:
        device = x0.device
        t = renoise_levels(cfg.renoise, 0.0, [seed_for(cfg.seed, "rl-dm", epoch, i, "t") for i in batch.samples])
        t = t.to(device)
        eps = randn_rows(
            [seed_for(cfg.seed, "rl-dm", epoch, i, "renoise") for i in batch.samples], models.latent_shape, device
        )
        with torch.no_grad():
            x_t = renoise(x0.detach().float(), 0.0, t, eps)
            v_real = models.backbone.velocity(models.teacher, x_t, t, batch.cond, w).float()
            v_fake = models.backbone.velocity(models.fake_run, x_t, t, batch.cond, 1.0).float()
            x_real, x_fake = x0_from_velocity(x_t, v_real, t), x0_from_velocity(x_t, v_fake, t)
        g = dmd_direction(x0, x_real, x_fake) * keep.view(-1, *[1] * (x0.ndim - 1)).to(x0.device)
        dm = dmd_loss(x0, g) * (len(keep) / kept)  # the mean over the kept rows
        loss = loss + cfg.dm.weight * dm
        logs["loss/dm"] = float(dm.detach())
    if terms.bp:
        surrogate, value = reward_backprop(sess, batch, keep, x0)
        loss = loss + surrogate
        logs["loss/bp"] = value
    return loss, logs


def reward_backprop(sess: Session, batch: Batch, keep: Tensor, x0: Tensor) -> tuple[Tensor, float]:
    """``L_bp = scale mean_kept relu(margin - sum_k w_k r_k(decode(x0)))`` in two stages: its
    gradient w.r.t. ``x0`` chunk by chunk through the VAE and the rewards (memory bounded by
    ``bp.chunk``), then the surrogate ``<x0, dL/dx0>`` that carries it into the generator. The VAE
    decodes under the run's autocast, the rewards score in their own dtype. Returns (surrogate, L_bp)."""
    cfg, models = sess.cfg, sess.models
    names = cfg.bp.rewards or tuple(t.name for t in cfg.rewards if sess.rewards[t.name].info.differentiable)
    weights = {t.name: t.weight for t in cfg.rewards}
    leaf = x0.detach().requires_grad_(True)
    kept = kept_share(keep)
    value = 0.0
    for part in _chunks(len(keep), cfg.bp.chunk or len(keep)):
        with autocast(sess):
            images = models.backbone.decode(leaf[part]).float().clamp(0, 1)
        prompts = [sess.records[batch.prompt_ids[i]]["prompt"] for i in part]
        meta = [sess.records[batch.prompt_ids[i]] for i in part]
        with torch.autocast(sess.world.device.type, enabled=False):
            total = sum(weights[n] * sess.rewards[n](images, prompts, meta).float() for n in names)
        hinge = reward_hinge(total, cfg.bp.margin) * keep[part].to(total.device)
        part_loss = cfg.bp.scale * hinge.sum() / kept
        part_loss.backward()
        value += float(part_loss.detach())
    return (x0.double() * leaf.grad.double()).sum(), value


def generator_update(
    sess: Session, epoch: int, batches: list[Batch], advantages: list[Tensor], trained: tuple[int, ...]
) -> dict[str, float]:
    """Accumulate every (sub-batch, step) loss divided by their count, then ONE optimiser step (§5.5).

    With a policy gradient, samples whose advantage is exactly 0 leave the sub-batch's losses (as
    the official filter drops them): every row is still computed and the losses are means over the
    kept rows of the global sub-batch (:func:`kept_share`), so each rank keeps the rollout's batch
    shape, runs the same collectives, and the update does not depend on the world size."""

    cfg, models = sess.cfg, sess.models
    terms, last = cfg.terms, cfg.sampler.num_steps - 1
    steps = [*trained, *([last] if terms.dm or terms.bp else [])]
    if not steps:
        return {}
    divisor = len(batches) * len(steps)
    lo, hi = cfg.teacher_guidance
    w = lo if lo == hi else uniform(seed_for(cfg.seed, "rl-dm", epoch, "cfg"), lo, hi)
    sigmas = models.sigmas
    sums: dict[str, float] = {}
    spread = cfg.grpo.gradient_variance and bool(trained)
    per_batch_grads: list[Tensor] = []
    for b, (batch, adv) in enumerate(zip(batches, advantages, strict=True)):
        keep = adv != 0 if terms.ppo else torch.ones_like(adv, dtype=torch.bool)
        before = flat_grads(sess.gen_params) if spread else None
        for j in steps:
            with grad_sync(models.generator_run, b == len(batches) - 1 and j == steps[-1]), autocast(sess):
                x = batch.states[:, j]
                v = models.backbone.velocity(models.generator_run, x, float(sigmas[j]), batch.cond, 1.0)
                if j in trained:
                    loss, logs = ppo_term(sess, batch, keep, adv, j, x, v)
                    _accumulate(sums, logs, 1 / (len(batches) * len(trained)))
                else:  # the deterministic final step
                    x0 = x0_from_velocity(x.float(), v.float(), float(sigmas[j]))
                    loss, logs = final_step_loss(sess, epoch, batch, keep, x0, w)
                    _accumulate(sums, logs, 1 / len(batches))
                (loss / divisor).backward()
            if spread and j == trained[-1]:
                per_batch_grads.append(flat_grads(sess.gen_params) - before)
    if per_batch_grads:
        sums |= gradient_spread(torch.stack(per_batch_grads))
    sums["train/grad_norm_generator"] = clip_and_step(
        sess.gen_params, sess.optimizers["generator"], cfg.generator.optim.grad_clip
    )
    return sums


def ppo_term(
    sess: Session, batch: Batch, keep: Tensor, adv: Tensor, j: int, x: Tensor, v: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """The clipped PPO loss of step ``j`` (the mean over the rows ``keep`` marks in the global sub-batch,
    :func:`kept_share`) and its ratio statistics."""
    cfg, sigmas = sess.cfg, sess.models.sigmas
    mean, std = cps_mean_std(x, v, float(sigmas[j]), float(sigmas[j + 1]), cfg.sampler.eta)
    x_next = batch.states[:, j + 1]
    if cfg.grpo.log_prob == "exact":
        log_prob = gaussian_log_prob(x_next, mean, std)
    else:
        log_prob = simplified_log_prob(x_next, mean).double()
    old = batch.log_probs[:, j].double()
    clipped = adv.to(log_prob.device).clamp(-cfg.grpo.advantage_clip, cfg.grpo.advantage_clip)
    eps = cfg.grpo.clip_range
    per_sample = ppo_clipped_loss(log_prob, old, clipped, eps, eps)
    if cfg.grpo.log_prob == "exact" and cfg.grpo.exact_scale == "per_element":
        per_sample = per_sample * (2 * float(std) ** 2 / x_next[0].numel())  # the official gradient scale
    mask = keep.to(per_sample.device)
    kept = kept_share(keep)
    loss = (per_sample * mask).sum() / kept
    deviation = (torch.exp(log_prob.detach() - old) - 1).abs() * mask
    logs = {
        "loss/ppo": float(loss.detach()),
        "ppo/ratio_deviation_max": float(deviation.max()),
        "ppo/clipped_fraction": float((deviation > eps).double().sum() / kept),
    }
    return loss, logs


def _accumulate(sums: dict[str, float], logs: dict[str, float], weight: float) -> None:
    for key, value in logs.items():
        if key.endswith("_max"):
            sums[key] = max(sums.get(key, 0.0), value)
        else:
            sums[key] = sums.get(key, 0.0) + weight * value


def flat_grads(params: dict) -> Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten() for p in params.values()]
    ).cpu()


def gradient_spread(grads: Tensor) -> dict[str, float]:
    """Spread of the per-sub-batch policy gradients ``g_b`` (``[B, P]``): ``pg/grad_var`` is
    ``mean_b ||g_b - g_mean||^2`` (the trace of their covariance, divisor B - 1) and
    ``pg/grad_rel_var`` that over ``||g_mean||^2`` (noise to signal, free of the loss scale)."""
    mean = grads.mean(0)
    var = (grads - mean).pow(2).sum(1).sum() / max(len(grads) - 1, 1)
    return {"pg/grad_var": float(var), "pg/grad_rel_var": float(var / mean.pow(2).sum().clamp(min=1e-300))}


def ema_step(sess: Session, done: int) -> None:
    """The stage-2 EMA after optimiser step ``done`` (see :class:`rtdmd.train.rl.StageTwoEMASpec`):
    ``iterations_per_epoch`` updates of decay ``d(done)`` on the current weights, as one update."""
    cfg = sess.cfg
    if (done + 1) % cfg.ema.every == 0:
        decay = warmup_decay(done, cfg.ema.decay) ** cfg.iterations_per_epoch
        sess.ema.update(sess.gen_params, decay=decay)


def run_epoch(sess: Session, epoch: int) -> dict[str, float]:
    cfg = sess.cfg
    trained = trained_steps(cfg, epoch)
    batches = [rollout_batch(sess, epoch, i, trained) for i in range(cfg.iterations_per_epoch)]
    advantages, logs = epoch_advantages(sess, batches)
    if cfg.terms.dm:
        logs |= fake_update(sess, epoch, batches)
    logs |= generator_update(sess, epoch, batches, advantages, trained)
    ema_step(sess, epoch + 1)
    logs["train/trained_steps"] = float(sum(2**k for k in trained))  # bitmask of S_E
    return logs
