"""What one stage-2 epoch samples, from the seed and the epoch alone (rtdmd_method.md §5.2).

* :func:`k_repeat_batch`: sampler iteration ``i`` of epoch ``E`` picks ``batch_size / G`` distinct
  prompts, repeats each ``G`` times and shuffles; rank ``r`` takes its contiguous slice, so each
  chosen prompt appears exactly ``G`` times across all ranks.
* :func:`select_steps`: SubGRPO's ``M`` distinct stochastic steps of the epoch (the same on every rank).
* :func:`noise_seeds`: per image, the seed of its initial latent and of each step's injected
  noise. Inside a prompt group the stochastic steps that are *not* trained this epoch share noise
  (common random numbers), so the group's reward differences come from the trained steps and the
  initial latent; trained steps and initial latents are independent per image.

The official code seeds Python's ``Random(seed + 100000 E + 104729)`` for the steps and
``sha256(prompt)[:4] + 10007 k + 100000 E`` for the shared noise; here every draw is a
``seed_for`` coordinate, which keeps the same properties (identical across ranks, new each epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rtdmd.seeding import INIT_STEP, seed_for


def k_repeat_batch(
    seed: int, epoch: int, iteration: int, num_prompts: int, batch_size: int, group_size: int
) -> list[int]:
    """Prompt indices of one sampler iteration's global batch (length ``batch_size``)."""
    if batch_size % group_size:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the group size {group_size}")
    num_unique = batch_size // group_size
    if num_unique > num_prompts:
        raise ValueError(f"{num_unique} distinct prompts per iteration, but only {num_prompts} prompts")
    gen = torch.Generator().manual_seed(seed_for(seed, "rl-prompts", epoch, iteration))
    chosen = torch.randperm(num_prompts, generator=gen)[:num_unique]
    order = torch.randperm(batch_size, generator=gen)
    return chosen.repeat_interleave(group_size)[order].tolist()


def select_steps(seed: int, epoch: int, candidates: Sequence[int], num: int) -> tuple[int, ...]:
    """``num`` distinct steps drawn uniformly from ``candidates`` for epoch ``epoch``, sorted."""
    if not 0 <= num <= len(candidates):
        raise ValueError(f"cannot choose {num} of the {len(candidates)} steps {list(candidates)}")
    gen = torch.Generator().manual_seed(seed_for(seed, "rl-steps", epoch))
    pick = torch.randperm(len(candidates), generator=gen)[:num]
    return tuple(sorted(candidates[int(i)] for i in pick))


def noise_seeds(
    seed: int, epoch: int, sample: int, prompt: str, stochastic: Sequence[int], trained: Sequence[int], num_steps: int
) -> list[int]:
    """``[init, step 0, ..., step T-1]`` seeds of one image (``sample``: its index in the epoch).

    Stochastic steps outside ``trained`` draw the group's shared noise (a function of the prompt,
    the step and the epoch); everything else is the image's own.
    """
    row = [seed_for(seed, "rl", epoch, sample, INIT_STEP)]
    for k in range(num_steps):
        shared = k in stochastic and k not in trained
        row.append(seed_for(seed, "rl-shared", epoch, prompt, k) if shared else seed_for(seed, "rl", epoch, sample, k))
    return row
