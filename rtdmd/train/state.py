"""Training state in one safetensors file per checkpoint: trainable weights, optimiser moments, EMA.

Works the same for plain modules, DDP and FSDP2: weights and optimiser state are gathered as full
tensors with ``torch.distributed.checkpoint.state_dict`` (every rank takes part, rank 0 writes) and
scattered back on load (every rank reads the file). Keys:
``<role>/<param>``, ``opt/<role>/<param>/<moment>``, ``ema/<param>``; the step, EMA update count
and optimiser hyperparameters go into the file's metadata.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from rtdmd.checkpoint import load_tensors, save_tensors
from rtdmd.errors import RtdmdError
from rtdmd.files import parse_jsonl, write_text_atomic
from rtdmd.train.roles import EMA

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
LOAD = StateDictOptions(full_state_dict=True, strict=False)
CHECKPOINT = re.compile(r"step_(\d{8})\.safetensors$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.safetensors"


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file of ``run_dir``, newest first."""
    found = [
        (int(m.group(1)), p)
        for p in (run_dir / "checkpoints").glob("step_*.safetensors")
        if (m := CHECKPOINT.search(p.name))
    ]
    return sorted(found, reverse=True)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(run_dir)
    return found[0] if found else None


def full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def collect(
    roles: dict[str, tuple[nn.Module, torch.optim.Optimizer]], ema: EMA
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Gather full tensors (a collective under DDP/FSDP: call on every rank; complete on rank 0)."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for role, (net, optim) in roles.items():
        for name, param in net.named_parameters():  # trainable weights only: no frozen base, no buffers
            if param.requires_grad:
                tensors[f"{role}/{name.removeprefix('module.')}"] = full(param)
        opt_state = get_optimizer_state_dict(net, optim, options=FULL)  # empty on ranks > 0
        for name, moments in opt_state.get("state", {}).items():
            for key, value in moments.items():
                tensors[f"opt/{role}/{name}/{key}"] = torch.as_tensor(value)
        meta[f"param_groups/{role}"] = json.dumps(opt_state.get("param_groups", []))
    for name, value in ema.state_dict().items():
        tensors[f"ema/{name}"] = full(value)
    meta["ema_updates"] = str(ema.num_updates)
    return tensors, meta


def save(
    path: Path, step: int, roles: dict[str, tuple[nn.Module, torch.optim.Optimizer]], ema: EMA, is_main: bool
) -> None:
    tensors, meta = collect(roles, ema)
    if is_main:
        save_tensors(tensors, path, metadata={**meta, "step": str(step)})


class RunStateError(RtdmdError, ValueError):
    """A run directory whose state cannot be resumed without a person's decision."""


UNREADABLE = (SafetensorError, OSError, ValueError, KeyError)  # a torn, truncated or foreign file


def resume(
    run_dir: Path, roles: dict[str, tuple[nn.Module, torch.optim.Optimizer]], ema: EMA, is_main: bool = True
) -> int:
    """Restore the newest readable checkpoint of ``run_dir`` (if any) and, on the main process, drop
    the ``stats.jsonl`` rows logged after it; returns the step to continue from (0 for a new run).

    A checkpoint that cannot be read (a kill or a full disk mid-write on a file system without atomic
    rename, a copy cut short) is skipped with a warning for the one before it; it is overwritten
    when the run reaches its step again."""
    start, found = 0, checkpoints(run_dir)
    for number, (_, path) in enumerate(found):
        try:
            start = load(path, roles, ema)
            break
        except UNREADABLE as error:
            if number == len(found) - 1:  # a failed load may have set part of the state: never start over on it
                raise RunStateError(
                    f"no checkpoint of {run_dir} can be read (the oldest, {path.name}: {error}): "
                    "start the run in a new run_dir"
                ) from None
            if is_main:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                warnings.warn(f"checkpoint {path} is unreadable ({reason}): resuming from an earlier one", stacklevel=2)
    stats = run_dir / "stats.jsonl"
    if is_main and stats.exists():
        write_text_atomic(stats, "".join(line + "\n" for line in logged_until(stats, start)))
    return start


def logged_until(stats: Path, step: int) -> list[str]:
    """The lines of ``stats`` whose ``step`` is at most ``step``. A last line that is not JSON is what
    a kill mid-write leaves: it is dropped; a bad line before it is a :class:`RunStateError`."""
    rows = parse_jsonl(
        stats.read_text(), str(stats), bad="last", repair="repair or delete that line, then rerun", error=RunStateError
    )
    return [json.dumps(row) for _, row in rows if row["step"] <= step]


def load(path: Path, roles: dict[str, tuple[nn.Module, torch.optim.Optimizer]], ema: EMA) -> int:
    """Restore weights, optimiser moments and EMA; return the step the checkpoint was written after."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_tensors(path)
    for role, (net, optim) in roles.items():
        prefix = f"{role}/"
        set_model_state_dict(
            net, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, options=LOAD
        )
        state: dict[str, dict[str, Tensor]] = {}
        opt_prefix = f"opt/{role}/"
        for key, value in tensors.items():
            if key.startswith(opt_prefix):
                name, moment = key[len(opt_prefix) :].rsplit("/", 1)
                state.setdefault(name, {})[moment] = value
        groups = json.loads(meta[f"param_groups/{role}"])
        set_optimizer_state_dict(net, optim, {"state": state, "param_groups": groups}, options=LOAD)
    shadow = {}
    for name, current in ema.state_dict().items():
        value = tensors[f"ema/{name}"].to(current.device)
        shadow[name] = (
            distribute_tensor(value, current.device_mesh, current.placements) if isinstance(current, DTensor) else value
        )
    ema.load_state_dict(shadow, int(meta["ema_updates"]))
    return int(meta["step"])
