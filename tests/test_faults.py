"""Faults and bad input through the real entry points: one line on stderr, exit code 2, nothing lost.

Each test injects one fault (a bad file, a torn write, a missing device, a full disk) and checks the
message, the exit code and, where work was interrupted, that a rerun gives what a run that never
failed gives."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import one_error_line, run_main

from bench import cli as bench_cli
from rtdmd.checkpoint import load_tensors
from rtdmd.train import cli as train_cli

# ---------------------------------------------------------------- cards and configs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\n  display: [unclosed\n", "invalid YAML (line 2"),
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_a_broken_method_card_is_one_line(tmp_path, capsys, text, expected):
    card = tmp_path / "card.yaml"
    card.write_text(text)
    code, err = run_main(bench_cli.main, ["methods", str(card)], capsys)
    assert code == 2 and expected in one_error_line(err) and "method card" in err


def test_a_broken_training_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("steps: 2\nsampler: {num_steps: 4\n")
    code, err = run_main(train_cli.main, ["distill", "--config", str(config), "--dry-run"], capsys)
    assert code == 2 and "invalid YAML" in one_error_line(err)


# ---------------------------------------------------------------- prompt files


def suite_fault(tmp_path, capsys, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    argv = [
        "generate",
        "--method",
        "tiny-cps4",
        "--suite",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    code, err = run_main(bench_cli.main, argv, capsys)
    assert code == 2
    return one_error_line(err)


def test_a_prompt_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    line = suite_fault(tmp_path, capsys, "p.txt", b"a red circle\nfour \xff cyan circles\n")
    assert "not UTF-8" in line and "line 2" in line and "p.txt" in line


def test_a_torn_jsonl_line_names_file_and_line(tmp_path, capsys):
    line = suite_fault(tmp_path, capsys, "p.jsonl", b'{"prompt": "a red circle"}\n{"prompt": "four cy\n')
    assert "p.jsonl line 2 is not valid JSON" in line


def test_an_empty_prompt_file_says_so(tmp_path, capsys):
    line = suite_fault(tmp_path, capsys, "p.txt", b"\n \n")
    assert "holds no prompts" in line and "manifest" not in line


def test_a_training_prompt_file_that_is_not_utf8_stops_before_training(tmp_path, capsys):
    bad = tmp_path / "train.txt"
    bad.write_bytes(b"\xfe\xff")
    argv = ["distill", "--config", "tiny", f"prompt_file={bad}", f"run_dir={tmp_path / 'run'}", "device=cpu"]
    code, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "not UTF-8" in one_error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_torn_summary_is_one_line_and_aggregate_rewrites_it(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--method", "tiny-cps4", "--suite", "toy-geneval-quick", "--limit", "3", "--metrics", "brightness"]
    assert run_main(bench_cli.main, [*argv, "--device", "cpu", "--out", str(out)], capsys)[0] == 0
    summary = out / "tiny-cps4" / "toy-geneval-quick" / "summary.json"
    whole = summary.read_bytes()
    summary.write_bytes(whole[:150])
    code, err = run_main(bench_cli.main, ["report", str(summary), "--out", str(tmp_path / "r.md")], capsys)
    assert code == 2 and "summary.json is not valid JSON" in one_error_line(err)
    assert run_main(bench_cli.main, ["aggregate", str(summary.parent)], capsys)[0] == 0
    assert summary.read_bytes() == whole


# ---------------------------------------------------------------- environment


def test_a_hub_suite_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    argv = ["generate", "--method", "tiny-cps4", "--suite", "hub:nobody/no-such-prompts", "--out", str(tmp_path / "o")]
    code, err = run_main(bench_cli.main, [*argv, "--device", "cpu"], capsys)
    line = one_error_line(err)
    assert code == 2 and "hub dataset nobody/no-such-prompts cannot be loaded" in line


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["distill", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "device=cuda"]
    code, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "CUDA" in one_error_line(err)
    argv = ["generate", "--method", "tiny-cps4", "--suite", "toy-geneval-quick", "--limit", "1"]
    code, err = run_main(bench_cli.main, [*argv, "--out", str(tmp_path / "out"), "--device", "cuda"], capsys)
    # an option's value: typer's usage error names the option and the reason, without a traceback
    assert code == 2 and "Invalid value for '--device'" in err and "no CUDA device" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("number", "expected"),
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "cannot write"), (errno.EACCES, "cannot write")],
)
def test_os_write_failures_are_one_line(tmp_path, capsys, monkeypatch, number, expected):
    """A full disk or a read-only run_dir (root ignores permission bits, so the OS error is injected)."""
    import rtdmd.run_dir

    def refuse(*args, **kwargs):
        raise OSError(number, "injected", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(rtdmd.run_dir, "write_text_atomic", refuse)
    code, err = run_main(
        train_cli.main, ["distill", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "device=cpu"], capsys
    )
    line = one_error_line(err)
    assert code == 2 and expected in line and "config.yaml" in line


# ---------------------------------------------------------------- interrupted training


def distill(run: Path, steps: int, capsys) -> None:
    argv = ["distill", "--config", "tiny", f"run_dir={run}", "device=cpu", f"steps={steps}", "eval.every=0"]
    code, err = run_main(train_cli.main, argv, capsys)
    assert code == 0, err


def final_state(run: Path, steps: int) -> tuple[dict, list[dict]]:
    tensors = load_tensors(run / "checkpoints" / f"step_{steps:08d}.safetensors")
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    return tensors, [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("plain") / "run"
    from rtdmd.config import load
    from rtdmd.train.distill import train
    from rtdmd.train.distill_config import DistillConfig

    train(
        load(DistillConfig, "tiny", [f"run_dir={run}", "device=cpu", "steps=4", "eval.every=0"], group="distill"), False
    )
    return run


def assert_same_run(run: Path, plain: Path) -> None:
    """The same tensors, the same stats rows (but their times), the same checkpoint bytes."""
    tensors, rows = final_state(run, 4)
    expected_tensors, expected_rows = final_state(plain, 4)
    assert tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(tensors[k], expected_tensors[k]) for k in tensors)
    assert rows == expected_rows
    name = "checkpoints/step_00000004.safetensors"
    assert (run / name).read_bytes() == (plain / name).read_bytes()


def test_a_torn_last_stats_line_is_dropped_on_resume(tmp_path, capsys, uninterrupted):
    run = tmp_path / "run"
    distill(run, 2, capsys)
    with (run / "stats.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss/fa')  # a kill in the middle of a write
    distill(run, 4, capsys)
    assert_same_run(run, uninterrupted)


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, uninterrupted):
    run = tmp_path / "run"
    distill(run, 4, capsys)
    latest = run / "checkpoints" / "step_00000004.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="step_00000004.safetensors is unreadable"):
        distill(run, 4, capsys)
    assert_same_run(run, uninterrupted)


def test_no_readable_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    distill(run, 2, capsys)
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"not a checkpoint")
    argv = ["distill", "--config", "tiny", f"run_dir={run}", "device=cpu", "steps=4", "eval.every=0"]
    code, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "no checkpoint" in one_error_line(err) and "new run_dir" in err


def test_a_corrupt_stats_line_before_the_last_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    distill(run, 2, capsys)
    lines = (run / "stats.jsonl").read_text().splitlines()
    (run / "stats.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    argv = ["distill", "--config", "tiny", f"run_dir={run}", "device=cpu", "steps=4", "eval.every=0"]
    code, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "stats.jsonl line 1 is not valid JSON" in one_error_line(err)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, capsys, umask, mode):
    import os

    old = os.umask(umask)
    try:
        distill(tmp_path / "run", 2, capsys)
    finally:
        os.umask(old)
    for name in ("config.yaml", "env.json", "checkpoints/step_00000002.safetensors"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == mode, name


def test_a_moved_run_directory_resumes(tmp_path, capsys, uninterrupted):
    distill(tmp_path / "before", 2, capsys)
    (tmp_path / "before").rename(tmp_path / "after")
    distill(tmp_path / "after", 4, capsys)
    assert_same_run(tmp_path / "after", uninterrupted)
    assert f"run_dir: {tmp_path / 'after'}" in (tmp_path / "after" / "config.yaml").read_text()


# ---------------------------------------------------------------- processes


def test_detector_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of a process scoring toy GenEval: its detector workers (and the resource tracker) exit
    instead of staying alive for good. The parent is killed while its pool is alive (after a batch)."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import time, numpy as np\n"
        "from rtdmd.toyworld import rewards as toy\n"
        "if __name__ == '__main__':\n"
        "    toy.detect_many([np.full((64, 64, 3), 250 - i, np.uint8) for i in range(16)])\n"
        "    print(' '.join(str(p) for p in toy._POOL[0][1]._processes), flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "RTDMD_TOY_DETECTOR_WORKERS": "2"}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split()[2] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 120  # generous: the check is that they go, not how fast
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(pid) for pid in workers)


def test_a_second_process_on_the_same_run_stops_with_one_line(tmp_path, capsys):
    """Two `rtdmd-bench` (or `rtdmd-train`) on one output at once: the second stops, the first's
    files are untouched. The first is simulated by holding the run's lock here."""
    from rtdmd.run_dir import exclusive

    root = tmp_path / "out" / "tiny-cps4" / "toy-geneval-quick"
    argv = ["generate", "--method", "tiny-cps4", "--suite", "toy-geneval-quick", "--limit", "2"]
    with exclusive(root):
        code, err = run_main(bench_cli.main, [*argv, "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and "is in use by pid" in one_error_line(err)
    code, err = run_main(bench_cli.main, [*argv, "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 0, err  # released: the same command now runs
    with exclusive(tmp_path / "run"):
        argv = ["distill", "--config", "tiny", f"run_dir={tmp_path / 'run'}", "device=cpu", "steps=2"]
        code, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "is in use by pid" in one_error_line(err)


def test_a_truncated_image_is_named_by_score_and_replaced_by_generate(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--method", "tiny-cps4", "--suite", "toy-geneval-quick", "--limit", "3", "--device", "cpu"]
    assert run_main(bench_cli.main, [*argv, "--out", str(out)], capsys)[0] == 0
    root = out / "tiny-cps4" / "toy-geneval-quick"
    clean = {p.name: p.read_bytes() for p in sorted((root / "images").rglob("*.png"))}
    victim = sorted((root / "images").rglob("*.png"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    code, err = run_main(bench_cli.main, ["score", str(root), "--metrics", "brightness", "--device", "cpu"], capsys)
    assert code == 2 and victim.name in one_error_line(err) and "rtdmd-bench generate" in err
    assert run_main(bench_cli.main, [*argv, "--out", str(out)], capsys)[0] == 0
    assert {p.name: p.read_bytes() for p in sorted((root / "images").rglob("*.png"))} == clean
    assert run_main(bench_cli.main, ["score", str(root), "--metrics", "brightness", "--device", "cpu"], capsys)[0] == 0


def test_export_lora_to_an_unwritable_place_is_one_line(tmp_path, capsys):
    distill(tmp_path / "run", 2, capsys)
    (tmp_path / "blocked").write_text("a file, not a folder")
    argv = ["export-lora", str(tmp_path / "run"), "--out", str(tmp_path / "blocked" / "lora.safetensors")]
    code, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "blocked" in one_error_line(err)


def test_a_geneval_layout_file_keeps_its_metadata_and_a_plain_one_is_refused_before_generating(tmp_path, capsys):
    from importlib import resources

    source = resources.files("rtdmd.toyworld") / "suites" / "toy_geneval.jsonl"
    layout = tmp_path / "mine.jsonl"
    layout.write_text("".join(source.read_text().splitlines(keepends=True)[:3]))
    argv = ["run", "--method", "tiny-cps4", "--metrics", "toy-geneval", "--device", "cpu", "--out"]
    code, err = run_main(bench_cli.main, [*argv, str(tmp_path / "a"), "--suite", str(layout)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "tiny-cps4" / "mine" / "summary.json").read_text())
    assert "toy-geneval" in summary["metrics"]
    plain = tmp_path / "plain.txt"
    plain.write_text("a photo of a diamond\n")
    code, err = run_main(bench_cli.main, [*argv, str(tmp_path / "b"), "--suite", str(plain)], capsys)
    assert code == 2 and "needs per-prompt metadata" in one_error_line(err)
    assert not (tmp_path / "b" / "tiny-cps4").exists()  # refused before any image was made


def test_a_prompt_longer_than_the_text_encoder_is_said_once(tmp_path, capsys):
    suite = tmp_path / "long.txt"
    suite.write_text("a red circle\n" + "four cyan circles " * 600 + "\n")
    argv = ["generate", "--method", "tiny-cps4", "--suite", str(suite), "--out", str(tmp_path / "o"), "--device", "cpu"]
    code, err = run_main(bench_cli.main, argv, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: 1 of 2 prompts exceed the byte encoder's 32 tokens (the longest has 10799): the encoder sees only their beginning"
    ]


def test_every_family_says_which_encoder_cuts_a_long_prompt():
    from rtdmd.backbones.sd3 import SD3Backbone
    from rtdmd.testing import tiny_sd3_pipeline

    backbone = SD3Backbone(tiny_sd3_pipeline(), max_sequence_length=16)
    short, long = "a red circle", " ".join(["circle"] * 100)
    assert backbone.truncation_notes([short]) == []
    notes = backbone.truncation_notes([short, long])
    assert len(notes) == 3  # two CLIP encoders at 77 tokens, T5 at max_sequence_length 16
    assert sum("77 tokens" in n for n in notes) == 2 and sum("16 tokens" in n for n in notes) == 1


# ---------------------------------------------------------------- kills at every durable point

ROOT = Path(__file__).resolve().parents[1]


def killed_then_rerun(command: list[str], site: str, n: int) -> None:
    """Run ``command`` with a SIGKILL at the n-th pass through ``site``, check it died there, rerun it."""
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RTDMD_KILL_AT": f"{site}:{n}"}
    died = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert died.returncode == -9, (died.returncode, died.stderr[-2000:])
    env.pop("RTDMD_KILL_AT")
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]


def harness_outputs(out: Path) -> dict[str, bytes]:
    """The run's manifest, scores, summary and images, and the report's three files, with the output
    folder's own path (in the summary and the report) written as ``<out>``."""
    root = out / "tiny-cps4" / "toy-geneval-quick"
    files = [root / "manifest.jsonl", root / "scores.jsonl", root / "summary.json", *sorted(root.rglob("*.png"))]
    files += [out / f"report.{suffix}" for suffix in ("md", "json", "png")]
    return {str(p.relative_to(out)): p.read_bytes().replace(str(out).encode(), b"<out>") for p in files}


def harness_command(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "bench.cli", "run", "--method", "tiny-cps4", "--suite", "toy-geneval-quick",
        "--limit", "12", "--metrics", "brightness", "--device", "cpu", "--out", str(out), "--report",
        str(out / "report.md"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight_harness(tmp_path_factory):
    import os
    import subprocess

    out = tmp_path_factory.mktemp("straight")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(harness_command(out), cwd=ROOT, env=env, check=True, capture_output=True)
    return harness_outputs(out)


@pytest.mark.parametrize(
    ("site", "n"),
    [("generate-chunk", 1), ("generate-chunk", 2), ("score-batch", 1), ("aggregate-summary", 1), ("report-file", 2)],
)
def test_a_run_killed_at_any_durable_point_reruns_to_the_same_bytes(tmp_path, site, n, straight_harness):
    """12 prompts, compute batch 4: killed after the first or second of three generated chunks, after
    the first scored batch, after the summary, or between the report's files; the rerun's manifest,
    scores, summary, images and report equal a straight run's."""
    killed_then_rerun(harness_command(tmp_path / "out"), site, n)
    assert harness_outputs(tmp_path / "out") == straight_harness


@pytest.mark.parametrize(("site", "n"), [("train-logged", 1), ("train-logged", 3), ("train-checkpoint", 1)])
def test_training_killed_at_any_durable_point_resumes_to_the_same_bytes(tmp_path, site, n, uninterrupted):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "rtdmd.train.cli", "distill", "--config", "tiny", f"run_dir={run}"]
    killed_then_rerun([*command, "device=cpu", "steps=4", "eval.every=0"], site, n)
    assert_same_run(run, uninterrupted)


@pytest.fixture(scope="module")
def uninterrupted_rl(tmp_path_factory):
    import os
    import subprocess

    run = tmp_path_factory.mktemp("plain_rl") / "run"
    command = [sys.executable, "-m", "rtdmd.train.cli", "rl", "--config", "tiny", f"run_dir={run}", "device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([*command, "eval.every=0"], cwd=ROOT, env=env, check=True, capture_output=True)
    return run


def test_stage_two_killed_between_epochs_resumes_to_the_same_bytes(tmp_path, uninterrupted_rl):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "rtdmd.train.cli", "rl", "--config", "tiny", f"run_dir={run}", "device=cpu"]
    killed_then_rerun([*command, "eval.every=0"], "train-logged", 3)
    assert_same_run(run, uninterrupted_rl)


def test_a_training_reward_without_its_metadata_stops_before_training(tmp_path, capsys):
    rewards = "rewards=[{name: brightness, weight: 1.0}, {name: toy-geneval, weight: 1.0}]"
    argv = ["rl", "--config", "tiny", rewards, f"run_dir={tmp_path / 'run'}", "device=cpu"]
    code, err = run_main(train_cli.main, argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "metric toy-geneval needs per-prompt metadata" in line and "inline prompts" in line
    assert not (tmp_path / "run" / "stats.jsonl").exists()
