"""Shipped toy-world checkpoints (package data under ``rtdmd/toyworld/weights/``).

Each checkpoint ``<name>.safetensors`` has a model card ``<name>.md`` (command, seed, hardware,
wall time, final metrics) and a line in ``SHA256SUMS``; :func:`packaged` verifies the hash before
anything reads the file, so a truncated or edited checkpoint fails loudly instead of scoring wrong.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from rtdmd.errors import RtdmdError
from rtdmd.files import write_bytes_atomic, write_text_atomic

ROOT = Path(str(resources.files("rtdmd.toyworld") / "weights"))
SUMS = ROOT / "SHA256SUMS"


class WeightsError(RtdmdError, FileNotFoundError):
    pass


def expected_sha256() -> dict[str, str]:
    """``{file name: sha256}`` from ``SHA256SUMS`` (``sha256sum`` format)."""
    if not SUMS.is_file():
        return {}
    pairs = (line.split() for line in SUMS.read_text().splitlines() if line.strip())
    return {name.lstrip("*"): digest for digest, name in pairs}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged(name: str) -> Path:
    """The verified path of shipped checkpoint ``name`` (without ``.safetensors``)."""
    file = f"{name}.safetensors"
    path, sums = ROOT / file, expected_sha256()
    if file not in sums:
        known = ", ".join(sorted(n.removesuffix(".safetensors") for n in sums)) or "none"
        raise WeightsError(f"no shipped toy checkpoint {name!r} (shipped: {known})")
    if not path.is_file():
        raise WeightsError(f"shipped toy checkpoint {path} is missing: reinstall rtdmd or restore it from git")
    if (actual := sha256_file(path)) != sums[file]:
        raise WeightsError(f"{path} has sha256 {actual}, SHA256SUMS expects {sums[file]} (a modified checkpoint)")
    return path


def register(path: Path) -> str:
    """Copy a trained checkpoint into the package and record its sha256 (used when shipping)."""
    target = ROOT / path.name
    if path.resolve() != target.resolve():
        write_bytes_atomic(target, path.read_bytes())
    sums = expected_sha256() | {target.name: sha256_file(target)}
    write_text_atomic(SUMS, "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    return sums[target.name]
