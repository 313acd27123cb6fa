"""Variance of the stage-2 policy gradient at a fixed policy: SubGRPO against GRPO on all stochastic steps.

The paper claims SubGRPO (M of the stochastic steps per epoch, common noise inside a prompt group at
the others) lowers the variance of the policy gradient. This measures it directly: the generator
stays fixed (no optimiser step), and each epoch ``e`` draws fresh prompts, latents and noise, rolls
out, scores, computes the group advantages and accumulates the PPO part of the generator gradient
``g_e`` exactly as ``rtdmd-train rl`` does (same functions, same scaling), without the final-step
terms. Over ``E`` epochs::

    var     = sum_e ||g_e - g_mean||^2 / (E - 1)      (trace of the estimator's covariance)
    rel_var = var / ||g_mean||^2                       (noise to signal; free of the loss scale)

SubGRPO's expected gradient is 2/3 of the all-steps one (2 of 3 steps' terms), so ``rel_var``
compares like with like. The reward of the rollouts is the same policy's for both arms.

Each record keeps the Gram matrix ``K[e, f] = g_e . g_f`` of its epochs' gradients, so ``--compare``
can resample epochs (with replacement, each arm on its own: the arms are independent runs) and give a
95% percentile interval of the ratio of the two arms' ``var`` and ``rel_var``: a resample's statistics
follow from ``K`` alone (:func:`resampled_spread`).

    python bench/perf/pg_variance.py --arm rtdmd --epochs 60 --out pg_rtdmd.json
    python bench/perf/pg_variance.py --arm grpo-all-steps --epochs 60 --out pg_all.json
    python bench/perf/pg_variance.py --compare pg_rtdmd.json pg_all.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rtdmd import distributed  # noqa: E402
from rtdmd.config import load  # noqa: E402
from rtdmd.train import rl_step  # noqa: E402
from rtdmd.train.rl_config import RLConfig, trained_steps  # noqa: E402


def policy_gradient(sess: rl_step.Session, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO part of one epoch's generator gradient (flattened, float64) and the epoch's rewards."""
    trained = trained_steps(sess.cfg, epoch)
    batches = [rl_step.rollout_batch(sess, epoch, i, trained) for i in range(sess.cfg.iterations_per_epoch)]
    advantages, logs = rl_step.epoch_advantages(sess, batches)
    sigmas, backbone = sess.models.sigmas, sess.models.backbone
    divisor = len(batches) * (len(trained) + 1)  # as in the update: the final step counts in the divisor
    for batch, adv in zip(batches, advantages, strict=True):
        for j in trained:
            with rl_step.autocast(sess):
                x = batch.states[:, j]
                v = backbone.velocity(sess.models.generator_run, x, float(sigmas[j]), batch.cond, 1.0)
                loss, _ = rl_step.ppo_term(sess, batch, adv != 0, adv, j, x, v)
                (loss / divisor).backward()
    grad = rl_step.flat_grads(sess.gen_params)
    sess.optimizers["generator"].zero_grad(set_to_none=True)
    return grad, logs


def spread(grads: torch.Tensor) -> dict[str, float]:
    mean = grads.mean(0)
    var = float((grads - mean).pow(2).sum(1).sum() / (len(grads) - 1))
    return {"var": var, "mean_sq_norm": float(mean.pow(2).sum()), "rel_var": var / float(mean.pow(2).sum())}


def resampled_spread(gram: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``var`` and ``mean_sq_norm`` of ``n_boot`` resamples of the epochs (indices ``I`` drawn with
    replacement) from the Gram matrix ``K`` alone: with ``S = sum_{i in I} K[i, i]`` and
    ``T = sum_{i, j in I} K[i, j]``, ``||mean||^2 = T / E^2`` and ``var = (S - T / E) / (E - 1)``."""
    gram = np.asarray(gram, dtype=np.float64)
    n = len(gram)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    diag = gram[idx, idx].sum(axis=1)
    total = np.array([gram[np.ix_(i, i)].sum() for i in idx])
    return (diag - total / n) / (n - 1), total / n**2


def compare(paths: list[str], n_boot: int = 10_000) -> dict:
    """Ratios (first arm / second) of ``var`` and ``rel_var``, each with a 95% percentile interval."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    for path, record in zip(paths, records, strict=True):
        if "gram" not in record:
            raise SystemExit(f"{path} has no Gram matrix (written by an older pg_variance.py): measure it again")
    draws = [resampled_spread(np.array(r["gram"]), n_boot, seed) for seed, r in enumerate(records)]
    out = {"arms": [r["arm"] for r in records], "epochs": [r["epochs"] for r in records], "resamples": n_boot}
    for name, (num, den) in {
        "var": (draws[0][0], draws[1][0]),
        "rel_var": (draws[0][0] / draws[0][1], draws[1][0] / draws[1][1]),
    }.items():
        observed = records[0]["all"][name] / records[1]["all"][name]
        ratio = num / den
        out[f"{name}_ratio"] = {
            "value": observed,
            "ci95": [float(np.quantile(ratio, 0.025)), float(np.quantile(ratio, 0.975))],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy")
    parser.add_argument("--arm", default="rtdmd", choices=["rtdmd", "grpo-all-steps"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--max-seconds", type=float, default=0, help="stop after the epoch that passes this (0 = never)"
    )
    parser.add_argument("--out", default="pg_variance.json")
    parser.add_argument(
        "--compare", nargs=2, metavar="JSON", help="print the ratio of two records' var and rel_var with 95%% intervals"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. device=cpu iterations_per_epoch=1")
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare(args.compare), indent=1))
        return

    cfg = load(RLConfig, args.config, [f"arm={args.arm}", *args.overrides], group="rl")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=0))
    world = distributed.init(cfg.device)
    sess = rl_step.build_session(cfg, world, Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    grads, rewards = [], []
    for epoch in range(args.epochs):
        grad, logs = policy_gradient(sess, epoch)
        grads.append(grad)
        rewards.append(logs)
        print(f"epoch {epoch}: |g| {float(grad.norm()):.4g} mixture {logs['reward/mixture']:.4f}", flush=True)
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            break
    stacked = torch.stack(grads)
    half = len(stacked) // 2
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "peft")},
        "arm": args.arm,
        "epochs": len(grads),
        "images_per_epoch": cfg.batch_size * cfg.iterations_per_epoch,
        "group_size": cfg.grpo.group_size,
        "seconds": time.perf_counter() - t0,
        "all": spread(stacked),
        "first_half": spread(stacked[:half]),
        "second_half": spread(stacked[half:]),
        "gram": (stacked @ stacked.T).tolist(),
        "reward_mean": {k: sum(r[k] for r in rewards) / len(rewards) for k in rewards[0] if k.startswith("reward/")},
    }
    print(json.dumps({k: record[k] for k in ("arm", "all", "first_half", "second_half", "reward_mean")}, indent=1))
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
