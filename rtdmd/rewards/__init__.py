"""Rewards: one module per metric, registered by name in ``REWARDS``; shared by RL, reward
back-propagation, in-training evaluation and the benchmark."""

from rtdmd.rewards import clip, geneval_real, hps, imagereward, simple  # noqa: F401  (registers the rewards)
from rtdmd.rewards.base import REWARDS, Reward, RewardInfo

__all__ = ["REWARDS", "Reward", "RewardInfo"]
