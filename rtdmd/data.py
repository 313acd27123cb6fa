"""Training prompts: a text file (one prompt per line), read once, sampled by coordinates.

The prompt at position ``p`` of the training stream is ``perm_e[p mod N]`` where ``e = p // N`` and
``perm_e`` is a permutation seeded by ``seed_for(seed, "epoch", e)``: every prompt appears once per
epoch, and any step's batch is computed from the step number alone (resume needs no sampler state,
and the same global batch comes out on any number of processes).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from rtdmd.seeding import seed_for


def read_prompt_file(path: str | Path, sha256: str = "") -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file; ``sha256`` (if given) must match the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"prompt file {path} has sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256}")
    prompts = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_prompts: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed_for(seed, "epoch", epoch))
    return tuple(torch.randperm(num_prompts, generator=gen).tolist())


def batch_indices(seed: int, step: int, batch_size: int, num_prompts: int) -> list[int]:
    """Prompt indices of training step ``step``'s global batch."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_prompts)
        out.append(_epoch_permutation(seed, epoch, num_prompts)[offset])
    return out
