"""Run directories: the unit of reproducibility and resume.

A run directory holds the resolved ``config.yaml``, ``env.json`` (git sha, library versions,
devices, command line), ``stats.jsonl`` and the outputs. Rerunning the same command with the same
directory resumes it; rerunning with a different config is refused, naming the keys that differ.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from rtdmd.config import ConfigError, dump_yaml, to_dict
from rtdmd.errors import RtdmdError
from rtdmd.files import write_text_atomic

TRACKED_PACKAGES = ("rtdmd", "torch", "diffusers", "transformers", "peft", "safetensors", "numpy", "accelerate")


def git_state(path: Path | None = None) -> dict[str, Any]:
    """``{"sha", "date" (commit date), "dirty"}`` of the git checkout holding the package, or nulls outside git."""
    where = path or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {
            "sha": git("rev-parse", "HEAD"),
            "date": git("log", "-1", "--format=%cs"),
            "dirty": bool(git("status", "--porcelain")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "date": None, "dirty": None}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_device(device: torch.device) -> str:
    """The hardware a device name stands for: the GPU's name, or the CPU's architecture and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type.upper()} ({platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What determines a run's numbers besides its config: code, libraries, hardware (``device``: the
    one the run computes on, where known), command."""
    devices = []
    if torch.cuda.is_available():
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": {name: package_version(name) for name in TRACKED_PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
        **({"device": describe_device(device)} if device is not None else {}),
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def prepare(
    path: str | Path,
    cfg: Any,
    mutable: tuple[str, ...] = (),
    device: torch.device | None = None,
    elsewhere: str = "Use a new run_dir, or rerun with the same config to resume.",
) -> Path:
    """Create ``path`` for ``cfg`` or reopen it for resume.

    A new directory gets ``config.yaml`` and ``env.json``. An existing one must hold the same
    resolved config (otherwise :class:`ConfigError` lists the differing keys), except the keys in
    ``mutable`` (e.g. ``steps``, to extend a training run) and ``run_dir`` (the directory may have been
    moved), which are updated; the environment of
    the resumed start is appended to ``env.json["resumed"]``. ``elsewhere`` ends the error: what to do instead.
    """
    root = Path(path)
    config_file = root / "config.yaml"
    env_file = root / "env.json"
    mutable = (*mutable, "run_dir")  # a run directory moved or renamed still resumes (config.yaml is updated)
    if config_file.exists():
        old = _flatten(yaml.safe_load(config_file.read_text()) or {})
        new = _flatten(to_dict(cfg))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in mutable)
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
            raise ConfigError(f"run directory {root} holds a different config ({details}). {elsewhere}")
        env = json.loads(env_file.read_text()) if env_file.exists() else {}
        env.setdefault("resumed", []).append(environment(device))
        write_text_atomic(env_file, json.dumps(env, indent=2))
        if any(old.get(k) != new.get(k) for k in mutable):
            write_text_atomic(config_file, dump_yaml(cfg))
        return root
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_file, dump_yaml(cfg))
    write_text_atomic(env_file, json.dumps(environment(device), indent=2))
    return root


class RunBusyError(RtdmdError, RuntimeError):
    """Another process is working on the same run directory."""


LOCK = ".lock"


@contextlib.contextmanager
def exclusive(root: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``<root>/.lock`` (an advisory ``flock``, released when the process ends, however it ends):
    a second ``rtdmd-bench`` or ``rtdmd-train`` on the same run stops with one line instead of
    writing beside the first. ``enabled`` False (the non-main ranks of one run) holds nothing."""
    if not enabled:
        yield
        return
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunBusyError(
                f"{root} is in use by {holder}: wait for it to finish, or use another output directory"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
