"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW_RANK = Path(__file__).resolve().parent / "slow_rank"


@pytest.fixture
def torchrun():
    """Run ``python -m <module> <args>`` on 2 (``processes``) CPU processes (gloo) under torchrun; returns
    the process.

    ``--standalone`` lets torchrun pick a free port (no collisions between concurrent test runs);
    ``slow_rank=True`` makes rank 1 lag behind rank 0 (``tests/slow_rank/sitecustomize.py``). The
    timeout only stops a hang: a loaded 2-core machine may take minutes."""

    def run(module: str, *args: str, slow_rank: bool = False, processes: int = 2) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if slow_rank:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SLOW_RANK), env.get("PYTHONPATH")]))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            module,
            *args,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run
