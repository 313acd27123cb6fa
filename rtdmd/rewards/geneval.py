"""What a GenEval reward declares (:class:`RewardInfo`), for the real detector's metrics
(:mod:`rtdmd.rewards.geneval_real`) and the toy world's (:mod:`rtdmd.toyworld.rewards`); the judging
itself is :mod:`rtdmd.geneval.judge`."""

from __future__ import annotations

from rtdmd.rewards.base import RewardInfo

VARIANT_UNITS = {"official": "", "strict": ", strict: exact counts", "partial": ", partial credit"}


def geneval_info(version: str, variant: str) -> RewardInfo:
    """What a GenEval reward variant (toy or real detector) declares: per-image verdicts that need
    the prompt's metadata, aggregated as GenEval's task-averaged overall score."""
    return RewardInfo(
        version=version,
        higher_is_better=True,
        differentiable=False,
        needs=("tag", "include"),
        units=f"fraction correct (GenEval rule{VARIANT_UNITS[variant]})",
        aggregate="category_mean",
    )
