"""``bench/perf/scaling.py``: the table's arithmetic on made-up runs, and (slow) the whole driver on 1
and 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "perf"))

import scaling  # noqa: E402


def stage1_record(processes: int, seconds: float, losses: list[tuple[float, float]], peak: float) -> dict:
    steps = [{"loss_fake": f, "loss_generator": g} for f, g in losses]
    variant = {"seconds_per_iteration": seconds, "steps": steps, "peak_memory_gib": peak}
    return {"processes": processes, "variants": [variant]}


def test_efficiency_is_throughput_per_gpu_against_one_gpu_and_losses_are_compared_step_by_step():
    records = {
        1: stage1_record(1, 2.0, [(1.0, 0.5), (2.0, 0.25)], 70.0),
        2: stage1_record(2, 1.25, [(1.0, 0.5), (2.0, 0.26)], 40.0),
        4: stage1_record(4, 0.5, [(1.01, 0.5), (2.0, 0.25)], 25.0),
    }
    rows = scaling.summarise(1, 8, records)
    assert [r["gpus"] for r in rows] == [1, 2, 4]
    assert [r["images_per_s"] for r in rows] == pytest.approx([4.0, 6.4, 16.0])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.8, 1.0])
    assert [r["loss_max_relative_difference"] for r in rows] == pytest.approx([0.0, 0.04, 0.01])
    assert [r["peak_memory_gib"] for r in rows] == [70.0, 40.0, 25.0]


def test_a_stage2_epoch_counts_every_iterations_images():
    epoch = {"loss_fake": 1.0, "loss_dm": 0.1, "loss_bp": 0.0}
    records = {
        n: {"processes": n, "iterations_per_epoch": 16, "variants": [{"seconds_per_epoch": s, "epochs": [epoch]}]}
        for n, s in ((1, 64.0), (2, 40.0))
    }
    rows = scaling.summarise(2, 8, records)
    assert [r["images_per_s"] for r in rows] == pytest.approx([2.0, 3.2])
    assert rows[1]["efficiency"] == pytest.approx(0.8) and rows[1]["loss_max_relative_difference"] == 0.0


def test_a_loss_the_arm_does_not_have_is_skipped_and_one_logged_by_one_run_only_is_an_error():
    def record(n: int, dm: float | None) -> dict:
        epoch = {"loss_fake": 1.0, "loss_dm": dm, "loss_bp": None}  # an arm without BP
        return {"processes": n, "iterations_per_epoch": 1, "variants": [{"seconds_per_epoch": 1.0, "epochs": [epoch]}]}

    rows = scaling.summarise(2, 8, {1: record(1, 0.1), 2: record(2, 0.11)})
    assert rows[1]["loss_max_relative_difference"] == pytest.approx(0.1)
    with pytest.raises(SystemExit, match="loss_dm is logged by one run only"):
        scaling.summarise(2, 8, {1: record(1, 0.1), 2: record(2, None)})


@pytest.mark.slow
def test_the_driver_runs_one_global_batch_on_one_and_two_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "bench/perf/scaling.py", "--stage", "1", "--family", "sd35m", "--gpus", "1,2"]
    cmd += [
        "--global-batch",
        "2",
        "--steps",
        "2",
        "--resolution",
        "128",
        "--tiny",
        "--variant",
        "fsdp:distributed=fsdp",
    ]
    cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [r["gpus"] for r in record["rows"]] == [1, 2] and record["rows"][0]["efficiency"] == 1.0
    assert [record["runs"][n]["processes"] for n in ("1", "2")] == [1, 2]
    assert record["rows"][1]["loss_max_relative_difference"] < 5e-2  # bf16 autocast, reduction order
