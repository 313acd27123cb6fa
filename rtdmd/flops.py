"""Model FLOPs and utilisation: ``torch.utils.flop_counter`` counts, the cards' dense bf16 peaks."""

from __future__ import annotations

from collections.abc import Callable

import torch

PEAK_BF16_DENSE = {"H100": 989.4e12, "H200": 989.4e12}  # SXM, dense (no sparsity), FLOP/s
PEAK_HBM_BYTES = {"H100": 3.35e12, "H200": 4.8e12}  # SXM memory bandwidth, bytes/s


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 matrix peak of ``device`` in FLOP/s (None: a CPU or an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_DENSE.items() if k in name), None)


def peak_bandwidth(device: torch.device) -> float | None:
    """The memory bandwidth of ``device`` in bytes/s (None: a CPU or an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_HBM_BYTES.items() if k in name), None)


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``fn()`` runs (matrix products and convolutions, forward and backward), by
    ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
