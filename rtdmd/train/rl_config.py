"""Stage 2's config (``rtdmd-train rl``): arms, reward terms, SubGRPO, DM and BP settings, and the
steps each epoch trains. The recipe itself is in :mod:`rtdmd.train.rl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rtdmd.backbones.base import BackboneConfig
from rtdmd.distributed import Strategy
from rtdmd.flow.schedules import RTDMD_TIMESTEPS
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import require_per_image
from rtdmd.sampling import SamplerSpec
from rtdmd.trackers import TrackConfig
from rtdmd.train.distill_config import ACDMDSpec, RenoiseSpec
from rtdmd.train.evaluation import EvalSpec
from rtdmd.train.rl_plan import select_steps
from rtdmd.train.roles import CompilePart, LoraSpec, OptimSpec, RoleSpec


@dataclass(frozen=True)
class Terms:
    """Which parts of the hybrid gradient an arm uses."""

    ppo: bool  # the clipped policy gradient on stochastic steps
    subgrpo: bool  # only M of them per epoch, shared noise on the rest (False: all of them)
    dm: bool  # the final-step AC-DMD term
    bp: bool  # the final-step reward back-propagation


ARMS: dict[str, Terms] = {
    "rtdmd": Terms(ppo=True, subgrpo=True, dm=True, bp=True),
    "grpo-all-steps": Terms(ppo=True, subgrpo=False, dm=True, bp=True),
    "no-bp": Terms(ppo=True, subgrpo=True, dm=True, bp=False),
    "no-dm": Terms(ppo=True, subgrpo=True, dm=False, bp=True),
    "bp-only": Terms(ppo=False, subgrpo=False, dm=True, bp=True),
    "dmd-only": Terms(ppo=False, subgrpo=False, dm=True, bp=False),
}
Arm = Literal["rtdmd", "grpo-all-steps", "no-bp", "no-dm", "bp-only", "dmd-only"]


@dataclass(frozen=True)
class RewardTerm:
    """One reward of the mixture: a registered name, its weight, its constructor options
    (e.g. ``{scale: div26}`` for PickScore as the official training reward)."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage1Spec:
    """Where stage 1 left off: a ``rtdmd-train distill`` run directory (its last checkpoint's EMA
    generator LoRA and fake LoRA), or LoRA files (a path or ``shipped:<name>``; rank and alpha from
    the file's metadata, as ``rtdmd-train export-lora`` writes them). An empty fake LoRA starts the
    fake score from the teacher."""

    run: str = ""
    generator_lora: str = ""
    fake_lora: str = ""

    def validate(self) -> None:
        if self.run and (self.generator_lora or self.fake_lora):
            raise ValueError("give stage1.run or stage1.generator_lora/fake_lora, not both")


@dataclass(frozen=True)
class GRPOSpec:
    """The policy-gradient part. ``log_prob``: ``exact`` Gaussian transition log-densities (default)
    or the official ``simplified`` ``-mean((x' - mean)^2)``, whose ratios stay within ~1e-5 of 1
    (clip 1e-5). The exact log-ratio is the simplified one times ``N / (2 rho^2)`` (N latent elements,
    rho the step's noise std): 1e-5 in simplified units is 0.4-1.3 in exact units for SD3.5-M at
    512, so the exact default clip is PPO's usual 0.2.

    ``exact_scale``: the exact log-density's gradient is ``N / (2 rho^2)`` times the simplified
    one's, which would swamp the final-step terms (DMD 1e-3, BP 1e-4 are tuned against the
    simplified scale). ``per_element`` (default) multiplies step k's exact PPO term by
    ``2 rho_k^2 / N``: the ratio and its clipping use exact densities, and at the old policy the
    gradient equals the official one. ``density`` leaves the term unscaled."""

    group_size: int = 24
    log_prob: Literal["exact", "simplified"] = "exact"
    exact_scale: Literal["per_element", "density"] = "per_element"
    clip_range: float = 0.2
    advantage_clip: float = 5.0
    step_range: tuple[int, int] = (0, 2)  # the stochastic steps SubGRPO chooses from (inclusive)
    steps_per_epoch: int = 2  # M
    gradient_variance: bool = False  # log the spread of per-sub-batch policy gradients (memory: 1 copy per sub-batch)


@dataclass(frozen=True)
class DMSpec:
    """The final-step AC-DMD term: ``weight x`` the normalised DMD loss at ``s = 0``."""

    weight: float = 1e-3


@dataclass(frozen=True)
class BPSpec:
    """Final-step reward back-propagation: ``scale x mean relu(margin - sum_k w_k r_k(decode(x0)))``
    over the differentiable rewards of the mixture (``rewards`` empty) or the named ones;
    ``chunk``: images decoded and scored per backward (0 = the whole sub-batch)."""

    scale: float = 1e-4
    margin: float = 3.0
    chunk: int = 0
    rewards: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageTwoEMASpec:
    """The official stage-2 EMA. Its update, decay ``min((1 + n) / (10 + n), decay)`` with ``n``
    the optimiser steps done, runs when ``(n + 1) % every == 0``, once per sub-batch while ``n``
    stands still: ``iterations_per_epoch`` times on the same weights (the last call of one epoch and
    the others of the next), which leaves it near the current weights."""

    decay: float = 0.9
    every: int = 8


@dataclass(frozen=True)
class RLConfig:
    """Config schema of ``rtdmd-train rl`` (packaged YAMLs: ``rtdmd/configs/rl/*.yaml``)."""

    arm: Arm = "rtdmd"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    stage1: Stage1Spec = field(default_factory=Stage1Spec)
    generator: RoleSpec = field(
        default_factory=lambda: RoleSpec(lora=LoraSpec(init="normal"), optim=OptimSpec(lr=3e-6, weight_decay=1e-4))
    )
    fake: RoleSpec = field(default_factory=lambda: RoleSpec(lora=LoraSpec(init="normal")))
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(num_steps=4, eta=0.9, timesteps=RTDMD_TIMESTEPS))
    rewards: tuple[RewardTerm, ...] = ()
    grpo: GRPOSpec = field(default_factory=GRPOSpec)
    dm: DMSpec = field(default_factory=DMSpec)
    bp: BPSpec = field(default_factory=BPSpec)
    teacher_guidance: tuple[float, float] = (4.5, 4.5)
    renoise: RenoiseSpec = field(default_factory=RenoiseSpec)
    fake_objective: ACDMDSpec = field(default_factory=ACDMDSpec)
    fake_chunk: int = 0  # rows per fake-score forward (0 = all local samples at once)
    height: int = 512
    width: int = 512
    prompt_file: str = ""
    prompt_file_sha256: str = ""
    prompts: tuple[str, ...] = ()
    batch_size: int = 72  # images per sampler iteration, global over all processes
    iterations_per_epoch: int = 16  # sampler iterations = generator sub-batches per epoch
    epochs: int = 1000
    seed: int = 0
    precision: Literal["float32", "bfloat16"] = "bfloat16"
    distributed: Strategy = "ddp"
    gradient_checkpointing: bool = False
    # the fast path: regional torch.compile of these roles' transformer blocks ("teacher", "generator",
    # "fake") and of the VAE decoder ("vae"); the same losses up to rounding (tests/test_train_fast.py).
    # Not the generator with a policy gradient (validate: the PPO ratio at the old policy must stay
    # exactly 1)
    compile: tuple[CompilePart, ...] = ()
    ema: StageTwoEMASpec = field(default_factory=StageTwoEMASpec)
    checkpoint_every: int = 100
    log_every: int = 1
    log: TrackConfig = field(default_factory=TrackConfig)  # trackers beside stats.jsonl (rtdmd.trackers)
    eval: EvalSpec = field(default_factory=EvalSpec)
    device: str = "auto"
    run_dir: str = "runs/rl"

    @property
    def terms(self) -> Terms:
        return ARMS[self.arm]

    def validate(self) -> None:

        if not self.rewards:
            raise ValueError("give at least one reward in `rewards`")
        names = [r.name for r in self.rewards]
        require_per_image(names, "rewards")
        if len(set(names)) != len(names):
            raise ValueError(f"a reward appears twice in `rewards`: {names}")
        for name in self.bp.rewards:
            if name not in names:
                raise ValueError(f"bp.rewards names {name!r}, which is not in `rewards`")
        if self.terms.bp and not any(REWARDS.get(n).info.differentiable for n in self.bp.rewards or names):
            raise ValueError(f"arm {self.arm!r} back-propagates rewards, but none of {names} is differentiable")
        if not self.prompt_file and not self.prompts:
            raise ValueError("give a prompt_file or inline prompts")
        lo, hi = self.teacher_guidance
        if not 0 < lo <= hi:
            raise ValueError(f"teacher_guidance must be 0 < min <= max, got {self.teacher_guidance}")
        if self.sampler.scheduler or self.sampler.eta <= 0:
            raise ValueError("stage 2 rolls out with stochastic CPS steps: sampler.eta > 0 and no scheduler")
        first, last = self.grpo.step_range
        if not 0 <= first <= last < self.sampler.num_steps - 1:
            raise ValueError(
                f"grpo.step_range {self.grpo.step_range} must lie within the stochastic steps 0..{self.sampler.num_steps - 2}"
            )
        if self.terms.ppo and not 1 <= self.grpo.steps_per_epoch <= last - first + 1:
            raise ValueError(f"grpo.steps_per_epoch must lie in [1, {last - first + 1}]")
        if min(self.batch_size, self.iterations_per_epoch, self.epochs, self.checkpoint_every, self.log_every) < 1:
            raise ValueError("batch_size, iterations_per_epoch, epochs, checkpoint_every and log_every must be >= 1")
        if self.grpo.group_size < 2 or self.batch_size % self.grpo.group_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of grpo.group_size >= 2")
        if self.grpo.clip_range <= 0 or self.grpo.advantage_clip <= 0:
            raise ValueError("grpo.clip_range and grpo.advantage_clip must be > 0")
        if self.ema.every < 1 or not 0 <= self.ema.decay < 1:
            raise ValueError("ema.every must be >= 1 and ema.decay lie in [0, 1)")
        if "generator" in self.compile and self.terms.ppo:
            raise ValueError(
                f"compile: arm {self.arm!r} has a policy gradient, so the generator stays eager: its training forward must repeat the rollout's "
                "numbers exactly (PPO ratio 1 at the old policy), and compiled training kernels round differently "
                "from the rollout's; compile teacher, fake and vae"
            )
        if self.grpo.log_prob == "simplified" and self.grpo.clip_range > 1e-3:
            raise ValueError(
                f"grpo.clip_range {self.grpo.clip_range} never binds on simplified log-probs (their ratios stay "
                "within ~1e-5 of 1): the official value is 1e-5"
            )


def trained_steps(cfg: RLConfig, epoch: int) -> tuple[int, ...]:
    """The stochastic steps whose PPO term trains this epoch (SubGRPO's ``S_E``)."""
    if not cfg.terms.ppo:
        return ()
    candidates = list(range(cfg.grpo.step_range[0], cfg.grpo.step_range[1] + 1))
    if not cfg.terms.subgrpo:
        return tuple(candidates)
    return select_steps(cfg.seed, epoch, candidates, cfg.grpo.steps_per_epoch)
