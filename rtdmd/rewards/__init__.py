"""Rewards: one module per metric, registered by name in ``REWARDS``; shared by RL, reward
back-propagation, in-training evaluation and the benchmark."""

from rtdmd.rewards import clip, geneval_real, hps, imagereward, simple  # noqa: F401  (registers the rewards)
from rtdmd.rewards.base import REWARDS, Reward, RewardInfo

__all__ = ["REWARDS", "Reward", "RewardInfo", "metric_listing"]


def metric_listing() -> list[dict]:
    """Every registered metric as a plain dict (``rtdmd-bench metrics``): its :class:`RewardInfo`, the
    weights it downloads (hub repos or URLs) and the first line of its docstring."""
    rows = []
    for name in REWARDS.names():
        reward = REWARDS.get(name)
        info = reward.info
        rows.append(
            {
                "name": name,
                "version": info.version,
                "higher_is_better": info.higher_is_better,
                "units": info.units,
                "aggregate": info.aggregate,
                "needs": list(info.needs),
                "differentiable": info.differentiable,
                "weights": [w.repo or w.url for w in getattr(reward, "weights", ())],
                "description": ((reward.__doc__ or "").strip().splitlines() or [""])[0],
            }
        )
    return rows
