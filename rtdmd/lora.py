"""LoRA state dicts outside peft: read a file, find its ``alpha / rank``, merge it into base weights.

Stage 2 starts from the stage-1 LoRAs merged into the base weights (rtdmd_method.md §5.1), and the
benchmark merges a method card's LoRA stack in order (§7); both go through :func:`merge_lora_state_dict`.
A LoRA file here is peft-named (``<module>.lora_A[.<adapter>].weight``), as ``rtdmd-train
export-lora`` writes it and the official RTDMD and Flow-GRPO releases ship it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from rtdmd.errors import RtdmdError
from rtdmd.weights import WeightsError, packaged

LORA_KEY = re.compile(r"^(?P<module>.*)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
SHIPPED_PREFIX = "shipped:"


class LoraError(RtdmdError, ValueError):
    """A LoRA file that cannot be read or does not fit the network."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def metadata_alpha_over_rank(path: Path) -> float | None:
    """``lora_alpha / lora_rank`` from a safetensors file's metadata (``rtdmd-train export-lora``), if there."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "lora_alpha" in meta and "lora_rank" in meta:
        return float(meta["lora_alpha"]) / float(meta["lora_rank"])
    return None


def merge_lora_state_dict(net: nn.Module, tensors: dict[str, torch.Tensor], factor: float) -> int:
    """``W += factor * B A`` for every (A, B) pair; returns how many weights changed."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for prefix in ("base_model.model.", "module.", "_orig_mod.", "transformer."):
            key = key.removeprefix(prefix)
        match = LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"] + ".weight", {})[match["which"]] = value
    params = dict(net.named_parameters())
    incomplete = sorted(name for name, ab in pairs.items() if len(ab) != 2)
    if incomplete:
        raise LoraError(f"LoRA state dict has lora_A without lora_B (or the reverse) for {incomplete[:3]}")
    unknown = sorted(name for name in pairs if name not in params)
    if unknown or not pairs:
        raise LoraError(f"LoRA keys do not match this transformer: {unknown[:3] or 'no lora_A/lora_B pairs found'}")
    with torch.no_grad():
        for name, ab in pairs.items():
            weight = params[name]
            delta = ab["B"].to(weight.device, torch.float32) @ ab["A"].to(weight.device, torch.float32)
            weight.add_((factor * delta.reshape(weight.shape)).to(weight.dtype))
    return len(pairs)


def resolve_lora_file(source: str) -> Path:
    """A LoRA file path, or ``shipped:<name>``: a LoRA shipped in rtdmd's package data (sha256-verified)."""
    if source.startswith(SHIPPED_PREFIX):
        try:
            return packaged(source[len(SHIPPED_PREFIX) :])
        except WeightsError as error:
            raise LoraError(str(error)) from None
    path = Path(source)
    if not path.is_file():
        raise LoraError(f"LoRA file {source} does not exist")
    return path


def merge_lora_file(net: nn.Module, source: str, scale: float = 1.0) -> int:
    """Merge a self-describing LoRA file (rank and alpha in its metadata, as ``export-lora`` writes)."""
    path = resolve_lora_file(source)
    ratio = metadata_alpha_over_rank(path)
    if ratio is None:
        raise LoraError(f"{path} has no lora_rank/lora_alpha metadata (write it with `rtdmd-train export-lora`)")
    return merge_lora_state_dict(net, read_state_dict(path), scale * ratio)
