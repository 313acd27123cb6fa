"""One process per device under ``torchrun``; no-ops in a single process.

``init()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), picks NCCL on
CUDA and gloo on CPU, and returns the process's place in the world. ``wrap`` applies DDP or FSDP2
(``torch.distributed.fsdp.fully_shard``) to a trainable role.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

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


def init(device: str = "auto") -> World:
    """Join the process group when launched by torchrun; pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank) if device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
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
