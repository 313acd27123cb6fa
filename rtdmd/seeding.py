"""Randomness addressed by coordinates.

Every random draw in rtdmd (an image's initial latent, the noise a CPS step injects, a training
step's RNG) comes from ``seed_for(*coords)``: a SHA-256 hash of the coordinates that identify the
draw, e.g. ``(run_seed, prompt_id, sample_index, step)``. Results therefore do not depend on batch
size, prompt order, world size or rank, and resuming needs no pickled RNG state.

Noise is drawn on the CPU in float32 from a generator seeded with that hash and then moved to the
target device, so the same coordinates give the same noise on every machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

Coord = int | str

# The initial latent of an image is the draw at this step coordinate; step k's noise is at k >= 0.
INIT_STEP = -1


def seed_for(*coords: Coord) -> int:
    """A 63-bit seed from a tuple of int/str coordinates: ``sha256(json(coords))[:8] mod 2**63``.

    ``seed_for(1, "a")`` and ``seed_for(1, "a")`` agree in every process (unlike Python's ``hash``);
    ``seed_for(1)`` and ``seed_for("1")`` differ, because the type is part of the JSON encoding.
    """
    for c in coords:
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            raise TypeError(f"seed coordinates must be int or str, got {c!r} ({type(c).__name__})")
    digest = hashlib.sha256(json.dumps(list(coords), separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def randn(seed: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 tensor of ``shape`` from ``seed`` (drawn on the CPU, then moved)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device)


def randn_rows(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack one independent ``randn(seed, shape)`` per seed: ``[len(seeds), *shape]``."""
    return torch.stack([randn(s, shape) for s in seeds]).to(device)


def uniform(seed: int, low: float = 0.0, high: float = 1.0) -> float:
    """A float64 draw from ``U[low, high)`` addressed by ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def randint(seed: int, low: int, high: int) -> int:
    """An integer draw from ``{low, ..., high}`` (both inclusive) addressed by ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return int(torch.randint(low, high + 1, (), generator=gen))
