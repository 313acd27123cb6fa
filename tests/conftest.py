"""Shared test helpers."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_PORTS = itertools.count(29500 + os.getpid() % 1000)


@pytest.fixture
def torchrun():
    """Run ``python -m <module> <args>`` on 2 CPU processes (gloo) under torchrun; returns the process."""

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(next(_PORTS)),
            "-m",
            module,
            *args,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run
