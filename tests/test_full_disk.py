"""A full disk at every place the harness and the trainer write: one line naming the file, exit 2, no
temporary file left behind, and a rerun (with space again) that ends with the bytes of a run that never
failed.

Each job runs once to record its writes (every durable write passes :func:`rtdmd.errors.write_fault`);
then, for each write site (a file name with its numbers blanked), the job runs again with the disk
"full" at that site's first write (``RTDMD_FULL_AT``) and is rerun in the same place. Appends fail
half-way through their bytes, as a disk that fills mid-write does, so the torn-line repair is exercised.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from cli_runs import one_error_line, run_main

from bench import cli as bench_cli
from rtdmd import errors
from rtdmd.checkpoint import load_tensors
from rtdmd.train import cli as train_cli


def site_of(path: Path) -> str:
    """``images/seed0/0003_1.png`` -> ``#_#.png``, ``a1e4a280d27cad5b_0.png`` -> ``#_#.png``: one site per
    kind of file (hashes and numbers blanked)."""
    return re.sub(r"[0-9a-f]{8,}|\d+", "#", path.name)


def record_writes(monkeypatch, job: Callable[[], None], root: Path) -> dict[str, tuple[int, Path]]:
    """Run ``job`` once; for each write site, the pass number of its first write and that file's path
    relative to ``root``."""
    passes: list[Path] = []
    with monkeypatch.context() as m:
        m.setattr(errors, "write_fault", lambda path: passes.append(Path(path)))
        job()
    sites: dict[str, tuple[int, Path]] = {}
    for number, path in enumerate(passes, start=1):
        sites.setdefault(site_of(path), (number, path.relative_to(root)))
    return sites


def fail_each_site_then_rerun(monkeypatch, capsys, main, argv_in: Callable[[Path], list[str]], sites, tmp_path):
    """For each site, in a fresh folder: the disk fills at its first write, then the job is rerun.
    Yields (site, folder) after each successful rerun, for the caller to compare outputs."""
    for site, (number, relative) in sites.items():
        where = tmp_path / f"full-at-{number}"
        with monkeypatch.context() as m:
            m.setenv(errors.FULL_ENV, str(number))
            m.setattr(errors, "_passes", {})
            code, err = run_main(main, argv_in(where), capsys)
        line = one_error_line(err)
        assert code == 2 and "no space left" in line and str(where / relative) in line, (site, line)
        assert not [p for p in where.rglob("*.tmp")], site  # the failed write left no temporary file
        code, err = run_main(main, argv_in(where), capsys)
        assert code == 0, (site, err)
        yield site, where


# ---------------------------------------------------------------- harness: generate, score, aggregate, report


def harness_argv(where: Path) -> list[str]:
    return [
        "run", "--method", "tiny-cps4", "--suite", "toy-geneval-quick", "--limit", "8", "--metrics",
        "brightness,toy-fd", "--device", "cpu", "--out", str(where / "out"), "--report", str(where / "report.md"),
    ]  # fmt: skip


def files_of(where: Path) -> dict[str, bytes]:
    """Every file a job left under ``where`` but its lock and ``env.json`` (when and where it ran), with
    the folder's own path (in configs and summaries) written as ``<here>``: two folders differ in that only."""
    return {
        str(path.relative_to(where)): path.read_bytes().replace(str(where).encode(), b"<here>")
        for path in sorted(where.rglob("*"))
        if path.is_file() and path.name not in (".lock", "env.json")
    }


def test_a_full_disk_anywhere_in_a_harness_run(tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    sites = record_writes(monkeypatch, lambda: run_main(bench_cli.main, harness_argv(straight), capsys), straight)
    assert set(sites) == {
        "config.yaml", "env.json", "#_#.png", "manifest.part#.jsonl", "manifest.jsonl", "scores.part#.jsonl",
        "scores.jsonl", "set_scores.json", "summary.json", "report.md", "report.json", "report.png",
    }  # fmt: skip
    expected = files_of(straight)
    for site, where in fail_each_site_then_rerun(monkeypatch, capsys, bench_cli.main, harness_argv, sites, tmp_path):
        assert files_of(where) == expected, site


# ---------------------------------------------------------------- trainer: distill (with evaluation), rl, sample, export


def training_state(run: Path, final: str) -> dict[str, object]:
    """The final checkpoint's bytes and tensors, the stats rows but their times, and the eval grids."""
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return {
        "checkpoint": (run / "checkpoints" / final).read_bytes(),
        "tensors": {k: v.tolist() for k, v in load_tensors(run / "checkpoints" / final).items()},
        "stats": [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows],
        **{str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "eval").rglob("*.png"))},
    }


def test_a_full_disk_anywhere_in_distillation(tmp_path, capsys, monkeypatch):
    def argv(where: Path) -> list[str]:
        return ["distill", "--config", "tiny", f"run_dir={where / 'run'}", "device=cpu", "steps=4"]

    straight = tmp_path / "straight"
    sites = record_writes(monkeypatch, lambda: run_main(train_cli.main, argv(straight), capsys), straight)
    assert set(sites) == {"config.yaml", "env.json", "step_#.png", "stats.jsonl", "step_#.safetensors"}
    expected = training_state(straight / "run", "step_00000004.safetensors")
    for _site, where in fail_each_site_then_rerun(monkeypatch, capsys, train_cli.main, argv, sites, tmp_path):
        assert training_state(where / "run", "step_00000004.safetensors") == expected


def test_a_full_disk_anywhere_in_stage_two(tmp_path, capsys, monkeypatch):
    def argv(where: Path) -> list[str]:
        return ["rl", "--config", "tiny", f"run_dir={where / 'run'}", "device=cpu", "epochs=2"]

    straight = tmp_path / "straight"
    sites = record_writes(monkeypatch, lambda: run_main(train_cli.main, argv(straight), capsys), straight)
    assert "stage#.json" in sites and "step_#.safetensors" in sites and "stats.jsonl" in sites
    expected = training_state(straight / "run", "step_00000002.safetensors")
    for _site, where in fail_each_site_then_rerun(monkeypatch, capsys, train_cli.main, argv, sites, tmp_path):
        assert training_state(where / "run", "step_00000002.safetensors") == expected


def test_a_full_disk_anywhere_in_sampling_and_export(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert (
        run_main(train_cli.main, ["distill", "--config", "tiny", f"run_dir={run}", "device=cpu", "steps=2"], capsys)[0]
        == 0
    )

    def argv(where: Path) -> list[str]:
        return ["sample", "--config", "tiny", f"run_dir={where / 'samples'}", "device=cpu"]

    def export_argv(where: Path) -> list[str]:
        return ["export-lora", str(run), "--out", str(where / "lora.safetensors")]

    for job in (argv, export_argv):
        straight = tmp_path / f"straight-{job.__name__}"
        sites = record_writes(
            monkeypatch, lambda job=job, straight=straight: run_main(train_cli.main, job(straight), capsys), straight
        )
        expected = files_of(straight)
        for site, where in fail_each_site_then_rerun(
            monkeypatch, capsys, train_cli.main, job, sites, tmp_path / job.__name__
        ):
            assert files_of(where) == expected, site
