"""The stage-2 generator gradient split by term, at the start of a run (no optimiser step).

One epoch of rollouts of the packaged config; for each sub-batch, the gradient of each term alone
(exactly the losses ``rtdmd-train rl`` accumulates): the PPO term on the SubGRPO steps, the AC-DMD term
and the reward back-propagation on the final step. Prints, per term, the norm of the epoch-mean
gradient, the mean per-sub-batch norm and ``rel_var`` (the spread over sub-batches over the squared
norm of the mean; pure noise gives about the number of sub-batches), and the cosines of the terms'
mean gradients: which term drives the update, and whether it carries signal.

    python bench/perf/rl_terms.py --config toy --out rl_terms.json device=cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rtdmd import distributed  # noqa: E402
from rtdmd.config import load  # noqa: E402
from rtdmd.flow.path import x0_from_velocity  # noqa: E402
from rtdmd.train import rl_step  # noqa: E402
from rtdmd.train.rl_config import RLConfig, trained_steps  # noqa: E402

FINAL_STEP_ARMS = {"dm": "dmd-only", "bp": "no-dm"}  # arms whose final-step loss is that term alone


def term_gradient(sess: rl_step.Session, term: str, batch, adv: torch.Tensor, trained: tuple[int, ...]) -> torch.Tensor:
    for p in sess.gen_params.values():
        p.grad = None
    sigmas, backbone = sess.models.sigmas, sess.models.backbone
    keep = adv != 0
    if term == "ppo":
        for j in trained:
            x = batch.states[:, j]
            with rl_step.autocast(sess):
                v = backbone.velocity(sess.models.generator_run, x, float(sigmas[j]), batch.cond, 1.0)
                loss, _ = rl_step.ppo_term(sess, batch, keep, adv, j, x, v)
            (loss / len(trained)).backward()
    else:
        one = dataclasses.replace(sess, cfg=dataclasses.replace(sess.cfg, arm=FINAL_STEP_ARMS[term]))
        j = sess.cfg.sampler.num_steps - 1
        x = batch.states[:, j]
        lo, hi = sess.cfg.teacher_guidance
        with rl_step.autocast(sess):
            v = backbone.velocity(sess.models.generator_run, x, float(sigmas[j]), batch.cond, 1.0)
            x0 = x0_from_velocity(x.float(), v.float(), float(sigmas[j]))
            loss, _ = rl_step.final_step_loss(one, 0, batch, keep, x0, (lo + hi) / 2)
        loss.backward()
    return rl_step.flat_grads(sess.gen_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy")
    parser.add_argument("--out", default="rl_terms.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. device=cpu iterations_per_epoch=4")
    args = parser.parse_args()
    cfg = load(RLConfig, args.config, [*args.overrides], group="rl")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=0))
    world = distributed.init(cfg.device)
    sess = rl_step.build_session(cfg, world, Path(tempfile.mkdtemp()))
    trained = trained_steps(cfg, 0)
    batches = [rl_step.rollout_batch(sess, 0, i, trained) for i in range(cfg.iterations_per_epoch)]
    advantages, rewards = rl_step.epoch_advantages(sess, batches)
    grads = {
        term: torch.stack([term_gradient(sess, term, b, a, trained) for b, a in zip(batches, advantages, strict=True)])
        for term in ("ppo", "dm", "bp")
    }
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(world.device)}
    record["rewards"] = rewards
    record["sub_batches"] = len(batches)
    record["images_per_sub_batch"] = cfg.batch_size
    means = {term: g.mean(0) for term, g in grads.items()}
    for term, g in grads.items():
        spread = (g - means[term]).pow(2).sum(1).sum() / (len(g) - 1)
        record[term] = {
            "mean_norm": float(means[term].norm()),
            "sub_batch_norm": float(g.norm(dim=1).mean()),
            "rel_var": float(spread / means[term].pow(2).sum()),
        }
        print(
            f"{term}: |mean| {record[term]['mean_norm']:.3e}  sub-batch |g| {record[term]['sub_batch_norm']:.3e}  "
            f"rel_var {record[term]['rel_var']:.2f} (noise: {len(g)})"
        )
    cos = torch.nn.functional.cosine_similarity
    record["cosines"] = {
        f"{a}-{b}": float(cos(means[a], means[b], dim=0)) for a, b in (("ppo", "dm"), ("ppo", "bp"), ("dm", "bp"))
    }
    print(json.dumps(record["cosines"]))
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
