"""Stage 1's config (``rtdmd-train distill``): the method (AC-DMD or plain DMD), renoising levels, the
AC-DMD fake-score settings. The recipe is :mod:`rtdmd.train.distill`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rtdmd.backbones.base import BackboneConfig
from rtdmd.distributed import Strategy
from rtdmd.flow.schedules import RTDMD_TIMESTEPS
from rtdmd.sampling import SamplerSpec
from rtdmd.trackers import TrackConfig
from rtdmd.train.evaluation import EvalSpec
from rtdmd.train.roles import CompilePart, RoleSpec


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
    # the fast path: regional torch.compile of these roles' transformer blocks ("teacher", "generator",
    # "fake") and of the VAE decoder ("vae"); the same losses up to rounding (tests/test_train_fast.py),
    # with or without gradient_checkpointing
    compile: tuple[CompilePart, ...] = ()
    checkpoint_every: int = 1000
    log_every: int = 10
    log: TrackConfig = field(default_factory=TrackConfig)  # trackers beside stats.jsonl (rtdmd.trackers)
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
