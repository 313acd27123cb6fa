"""A training run directory's LoRAs, read in one place: ``export-lora``, stage 2's start from a stage-1
run, and the harness's ``kind: rtdmd`` method cards all go through :func:`read_run`.

A run (``rtdmd-train distill`` or ``rl``) keeps, in its latest checkpoint, its generator's EMA LoRA
(``ema/`` keys) and its fake score's LoRA (``fake/`` keys), with rank and alpha in its
``config.yaml``. A stage-2 run's LoRAs sit on top of its stage 1, which its config names (a stage-1
run directory, or LoRA files): :func:`role_merges` returns the whole chain from the base weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from torch import nn

from rtdmd.checkpoint import save_tensors
from rtdmd.errors import RtdmdError
from rtdmd.lora import merge_lora_file, merge_lora_state_dict
from rtdmd.train.state import latest_checkpoint, load_tensors

PREFIXES = {"generator": "ema/", "fake": "fake/"}  # a role's LoRA in a checkpoint (the generator's EMA)


class RunError(RtdmdError, ValueError):
    """A folder that is not a training run with a checkpoint, or a run without the asked LoRA."""


@dataclass(frozen=True)
class RunLora:
    """One run's latest checkpoint, as far as its LoRAs go."""

    run: Path
    step: int  # the checkpoint's step (stage 1) or epoch (stage 2)
    total: int  # the run's planned steps or epochs
    method: str  # "ac_dmd", "dmd", or "rtdmd-<arm>" for stage 2
    config: dict  # the run's config.yaml, as written
    checkpoint: Path

    @property
    def finished(self) -> bool:
        return self.step == self.total

    def lora_factor(self, role: str) -> float:
        """``alpha / rank`` of ``role``'s LoRA (``RunError`` if that role trained every weight)."""
        lora = (self.config.get(role) or {}).get("lora")
        if not lora:
            raise RunError(f"{self.run}: its {role} trained every weight, there is no LoRA to read")
        return float(lora["alpha"]) / float(lora["rank"])

    def tensors(self, role: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``role``'s LoRA tensors, peft-named (the generator's are its EMA)."""
        self.lora_factor(role)
        prefix = PREFIXES[role]
        tensors = load_tensors(self.checkpoint)
        return {
            k[len(prefix) :]: v if dtype is None else v.to(dtype) for k, v in tensors.items() if k.startswith(prefix)
        }


def read_run(run: str | Path) -> RunLora:
    run = Path(run)
    latest = latest_checkpoint(run)
    if latest is None or not (run / "config.yaml").is_file():
        raise RunError(f"{run} is not an rtdmd-train distill or rl run directory with a checkpoint")
    config = yaml.safe_load((run / "config.yaml").read_text())
    method = str(config.get("method") or f"rtdmd-{config.get('arm')}")
    total = int(config.get("steps", config.get("epochs", 0)))
    return RunLora(run, latest[0], total, method, config, latest[1])


def stage1_merges(stage1: dict, role: str) -> list[Callable[[nn.Module], int]]:
    """What a stage-2 config's ``stage1`` section (``run`` or ``<role>_lora``) merges into ``role``'s base."""
    if stage1.get("run"):
        return role_merges(stage1["run"], role)
    source = stage1.get(f"{role}_lora", "")
    return [partial(merge_lora_file, source=source)] if source else []


def role_merges(run: str | Path, role: str, scale: float = 1.0) -> list[Callable[[nn.Module], int]]:
    """Merges that turn the base transformer into ``run``'s ``role`` (``generator`` or ``fake``), in
    order: a stage-2 run's stage 1 first (at full strength), then the run's own LoRA times ``scale``."""
    found = read_run(run)
    chain = stage1_merges(found.config["stage1"], role) if "stage1" in found.config else []
    own = partial(merge_lora_state_dict, tensors=found.tensors(role), factor=scale * found.lora_factor(role))
    return [*chain, own]


def merge_all(net: nn.Module, merges: list[Callable[[nn.Module], int]]) -> int:
    """Apply ``merges`` to ``net`` in order; the number of LoRA pairs merged."""
    return sum(merge(net) for merge in merges)


def export_generator_lora(
    run: str | Path, path: str | Path, dtype: torch.dtype = torch.float16, allow_partial: bool = False, **meta: str
) -> Path:
    """The EMA generator LoRA of a finished ``distill`` or ``rl`` run (its last checkpoint; an
    unfinished run only with ``allow_partial``) as a peft-named safetensors file in ``dtype``; the
    metadata holds ``lora_rank``, ``lora_alpha``, the step and the run's method (or RL arm). A
    stage-2 run's file is its own LoRA: it applies on top of its stage 1."""
    found = read_run(run)
    if not found.finished and not allow_partial:
        raise RunError(f"{found.run} stopped at step {found.step} of {found.total}: finish it, or pass --allow-partial")
    tensors = found.tensors("generator", dtype)  # refuses a run whose generator trained every weight
    lora = found.config["generator"]["lora"]
    info = {"lora_rank": str(lora["rank"]), "lora_alpha": str(float(lora["alpha"]))}
    return save_tensors(tensors, path, metadata={**meta, "step": str(found.step), "method": found.method, **info})
