"""The fake score's stage-1 loss (rtdmd_method.md §4.2.3-4.2.4): ambient denoising score matching on
fresh generator samples (plain flow matching for DMD) plus the consistency regulariser with its
two-sample estimator; stage 2 reuses the consistency term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rtdmd.backbones.base import Cond
from rtdmd.flow.cps import cps_step
from rtdmd.flow.path import x0_from_velocity
from rtdmd.losses.ac_dmd import ambient_loss, ambient_target, consistency_loss
from rtdmd.seeding import randint, randn_rows, seed_for
from rtdmd.train.distill_config import DistillConfig
from rtdmd.train.roles import Models
from rtdmd.train.subinterval import sample_subinterval


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
