"""Safetensors checkpoints, written atomically (:mod:`rtdmd.files`) with a canonical header."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from rtdmd.files import atomic_path


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (as contiguous CPU copies) to ``path`` as safetensors, atomically, with a
    canonical header (:func:`canonical_header`): equal contents give equal bytes in any process."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(canonical_header(save(cpu, metadata=metadata)))
    return Path(path)


def canonical_header(data: bytes) -> bytes:
    """A safetensors file's bytes with its JSON header in one fixed order: metadata keys sorted, then
    the tensors by offset. The library's writer orders the metadata by a hash map whose seed changes
    from process to process, so a resumed run's checkpoints would otherwise differ in bytes only."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    ordered |= dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return load_file(str(path), device=str(device))
