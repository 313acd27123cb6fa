"""The toy world's images and scores are the same whichever CPU kernels compute them.

On this kind of machine PyTorch and MKL pick AVX-512 kernels; forcing AVX2 ones (as on an older CPU)
changes float32 results in the last bits, which moved 336 of the default run's 1240 float32 toy images
by a grey level and the toy-fd column in its third decimal. The toy method cards generate in float64
and the toy metrics compute in float64, so with one torch version the PNG files and scores must be
byte-identical (other machines and torch versions: within the tolerance in bench/perf/results/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def bench(out: Path, env: dict[str, str], *args: str) -> None:
    cmd = [sys.executable, "-m", "bench.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
    reason="this CPU has no AVX-512 kernels to compare with AVX2 ones",
)
@pytest.mark.parametrize("method", ["toy-euler4", "toy-rtdmd"])
def test_toy_images_and_scores_do_not_depend_on_the_cpu_kernels(tmp_path, method):
    runs = {}
    for name, env in (("avx512", {}), ("avx2", AVX2)):
        out = tmp_path / name
        gen = ["generate", "--method", method, "--suite", "toy-geneval-quick", "--limit", "32", "--device", "cpu"]
        bench(out, env, *gen, "--out", str(out))
        runs[name] = out / method / "toy-geneval-quick"
        bench(
            out,
            env,
            "score",
            str(runs[name]),
            "--metrics",
            "toy-geneval,toy-clip,toy-aesthetic,toy-fd",
            "--device",
            "cpu",
        )
    for file in ("manifest.jsonl", "scores.jsonl", "set_scores.json"):
        assert (runs["avx512"] / file).read_bytes() == (runs["avx2"] / file).read_bytes(), file
