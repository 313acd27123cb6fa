"""One process per device under ``torchrun``; no-ops in a single process.

``init()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), picks NCCL on
CUDA and gloo on CPU, and returns the process's place in the world. ``wrap`` applies DDP or FSDP2
(``torch.distributed.fsdp.fully_shard``) to a trainable role.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from rtdmd.errors import RtdmdError

Strategy = Literal["none", "ddp", "fsdp"]


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> range:
        """The global sample indices this rank computes (the global batch must divide evenly)."""
        if global_batch % self.size:
            raise ValueError(f"global batch {global_batch} does not split over {self.size} processes")
        per_rank = global_batch // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


class DeviceError(RtdmdError, ValueError):
    """A device name that is not one, or a device this machine does not have."""


DEVICES = "auto | cpu | cuda | cuda:N"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU where CUDA is available, else the CPU; ``cpu``; ``cuda``: this
    process's GPU (``LOCAL_RANK`` under torchrun); ``cuda:N``: GPU N. Anything else, or a GPU this
    machine lacks, raises :class:`DeviceError` with what to use instead."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise DeviceError(f"unknown device {name!r}: use {DEVICES}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {name}: no CUDA device is available here (torch {torch.__version__}): use cpu, or auto to "
            "take a GPU only where there is one"
        )
    device = torch.device("cuda", local_rank) if name in ("auto", "cuda") else torch.device(name)
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def init(device: str = "auto") -> World:
    """Join the process group when launched by torchrun; pick this process's device (:func:`resolve_device`)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return World(rank=rank, size=size, device=dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _reduce(value: torch.Tensor, op) -> torch.Tensor:
    """``all_reduce`` of a copy on the device the backend serves (NCCL: the GPU), returned on ``value``'s device."""
    out = value.detach().clone()
    if not dist.is_initialized():
        return out
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else out.device
    moved = out.to(backend_device)
    dist.all_reduce(moved, op=op)
    return moved.to(value.device)


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (a copy; unchanged in a single process)."""
    out = _reduce(value, dist.ReduceOp.SUM)
    return out / (dist.get_world_size() if dist.is_initialized() else 1)


def max_across(value: torch.Tensor) -> torch.Tensor:
    """The maximum of a tensor over all processes (a copy; unchanged in a single process)."""
    return _reduce(value, dist.ReduceOp.MAX)


def reduce_logs(logs: dict[str, float]) -> dict[str, float]:
    """Scalar logs averaged over all processes (keys ending in ``_max``: their maximum). The
    reductions run in sorted key order, the same on every rank; the result keeps ``logs``' order."""
    reduced = {
        k: float((max_across if k.endswith("_max") else mean_across)(torch.tensor(float(logs[k]))))
        for k in sorted(logs)
    }
    return {k: reduced[k] for k in logs}


def wrap(net: nn.Module, strategy: Strategy, world: World) -> nn.Module:
    """DDP or FSDP2 around a trainable role; the module itself when alone or ``strategy="none"``."""
    if world.size == 1 or strategy == "none":
        return net
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    blocks = [
        m
        for name, m in net.named_modules()
        if name.count(".") == 1 and name.split(".")[0].endswith("transformer_blocks")
    ]
    for block in blocks:  # block-level sharding, as the official FSDP wrap policy
        fully_shard(block)
    fully_shard(net)
    return net
