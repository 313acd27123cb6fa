"""Safetensors checkpoints and small files, written atomically.

A file is written to a temporary file in the target directory, flushed to disk, renamed over the
target, and the directory entry is flushed too: a crash leaves the old file or the new one, never a
torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` durably, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the file gets what open() would give it
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        Path(tmp).unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (config, JSON) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
