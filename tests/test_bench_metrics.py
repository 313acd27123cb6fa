"""Harness metrics beyond per-image means: set metrics (one value per run), category-mean metrics
(GenEval-style per-task tables), and the default `rtdmd-bench run` with no arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import bench.plan
from bench.aggregate import AggregateError, aggregate_stage
from bench.cli import app
from bench.plan import DefaultRun, resolve_run
from bench.runfiles import SET_SCORES
from bench.score import score_stage, set_key
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import RewardInfo

runner = CliRunner()
# unbalanced categories, so the mean of category means differs from the plain mean over prompts
PROMPTS = [
    ("a red circle", "shape"),
    ("a blue square", "shape"),
    ("a green triangle", "shape"),
    ("a yellow star", "shape"),
    ("two purple stars", "count"),
    ("three white squares", "count"),
]
METRICS = "brightness,test_set_brightness,test_category_brightness"


@REWARDS.register("test_set_brightness")
class SetBrightness:
    """Mean pixel value of the whole set, lower is better: a set metric with a known value."""

    info = RewardInfo(version="1", higher_is_better=False, differentiable=False, aggregate="set", units="mean pixel")
    calls = 0

    def __call__(self, images, prompts, meta):
        type(self).calls += 1
        assert images.shape[0] == len(prompts) == len(meta)
        return images.float().mean()


@REWARDS.register("test_category_brightness")
class CategoryBrightness:
    """Per-image mean pixel value, averaged per category first (GenEval's overall score)."""

    info = RewardInfo(version="1", higher_is_better=True, differentiable=False, aggregate="category_mean")

    def __call__(self, images, prompts, meta):
        return images.float().flatten(1).mean(1)


@pytest.fixture
def suite_file(tmp_path) -> Path:
    path = tmp_path / "cats.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in PROMPTS))
    return path


def run(out: Path, suite: Path):
    args = ["run", "--method", "tiny-teacher", "--method", "tiny-cps4", "--suite", str(suite), "--metrics", METRICS]
    return runner.invoke(app, [*args, "--reference", "tiny-teacher", "--out", str(out), "--device", "cpu"])


def image_mean(root: Path) -> float:
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    return float(
        np.mean([np.asarray(Image.open(root / r["file"]).convert("RGB"), dtype=np.float64) / 255 for r in rows])
    )


def test_set_metrics_are_computed_once_per_image_set_and_reported_without_intervals(tmp_path, suite_file):
    calls = SetBrightness.calls
    result = run(tmp_path / "out", suite_file)
    assert result.exit_code == 0, result.output
    assert SetBrightness.calls == calls + 2  # once per run, not per batch
    runs = {m: tmp_path / "out" / m / "cats" for m in ("tiny-teacher", "tiny-cps4")}
    for root in runs.values():
        manifest = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
        (row,) = json.loads((root / SET_SCORES).read_text())
        assert row["metric"] == "test_set_brightness" and row["version"] == "1" and row["n_images"] == 6
        assert row["key"] == set_key(manifest) and row["seed"] == 0
        assert row["value"] == pytest.approx(image_mean(root), abs=1e-6)
        assert all(r["metric"] != "test_set_brightness" for r in map(json.loads, (root / "scores.jsonl").open()))
    ours, ref = (json.loads((runs[m] / "summary.json").read_text())["metrics"] for m in ("tiny-cps4", "tiny-teacher"))
    entry = ours["test_set_brightness"]
    assert entry["ci95"] is None and entry["note"] == "set metric: no per-prompt bootstrap"
    assert entry["higher_is_better"] is False and entry["aggregate"] == "set"
    diff = entry["vs_reference"]
    assert diff["diff"] == pytest.approx(entry["value"] - ref["test_set_brightness"]["value"])
    assert diff["p_value"] is None and diff["ci_low"] is None

    report = (tmp_path / "out" / "cats_leaderboard.md").read_text()
    assert "test_set_brightness ↓ (v1, mean pixel)" in report
    best = min(("tiny-cps4", ours), ("tiny-teacher", ref), key=lambda p: p[1]["test_set_brightness"]["value"])[0]
    best_line = next(line for line in report.splitlines() if line.startswith(f"| {best.replace('-', ' ')}"))
    value = json.loads((runs[best] / "summary.json").read_text())["metrics"]["test_set_brightness"]["value"]
    assert f"**{value:.4f}**" in best_line  # lower is better: the smaller value is bold
    assert "| Method | brightness ↑ | test_category_brightness ↑ | test_set_brightness ↓ |" in report  # paired table
    assert f"{diff['diff']:+.4f} (set)" in report and "Set metrics score all images of a run seed at once" in report

    rerun = run(tmp_path / "out", suite_file)
    assert rerun.exit_code == 0 and SetBrightness.calls == calls + 2
    assert " ".join(rerun.output.split()).count("set metrics: 0 computed, 1 reused") == 2


def test_a_set_score_of_other_images_is_refused_and_then_recomputed(tmp_path, suite_file):
    assert run(tmp_path / "out", suite_file).exit_code == 0
    root = tmp_path / "out" / "tiny-cps4" / "cats"
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    black = np.zeros_like(np.asarray(Image.open(root / rows[0]["file"])))
    Image.fromarray(black).save(root / rows[0]["file"])  # as if this image had been regenerated
    import hashlib

    rows[0]["sha256"] = hashlib.sha256((root / rows[0]["file"]).read_bytes()).hexdigest()
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AggregateError, match="test_set_brightness were scored on other images"):
        aggregate_stage(root)
    calls = SetBrightness.calls
    result = score_stage(root, METRICS.split(","), device="cpu")
    assert result["set_scored"] == 1 and SetBrightness.calls == calls + 1
    assert result["scored"] == 2 and result["cached"] == 10  # 2 per-image metrics of the one changed image
    (row,) = json.loads((root / SET_SCORES).read_text())
    assert row["key"] == set_key(rows) and row["value"] == pytest.approx(image_mean(root), abs=1e-6)
    assert aggregate_stage(root)["metrics"]["test_set_brightness"]["value"] == row["value"]


def test_category_mean_metrics_report_the_plain_mean_and_a_per_category_table(tmp_path, suite_file):
    assert run(tmp_path / "out", suite_file).exit_code == 0
    root = tmp_path / "out" / "tiny-cps4" / "cats"
    scores = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    per_prompt = {r["prompt_id"]: r["score"] for r in scores if r["metric"] == "test_category_brightness"}
    category = {f"{i:05d}": c for i, (_, c) in enumerate(PROMPTS)}
    means = {c: np.mean([v for p, v in per_prompt.items() if category[p] == c]) for c in ("shape", "count")}
    entry = json.loads((root / "summary.json").read_text())["metrics"]["test_category_brightness"]
    assert entry["prompt_mean"] == pytest.approx(np.mean(list(per_prompt.values())))
    assert entry["value"] == pytest.approx(np.mean(list(means.values())))
    assert entry["value"] != pytest.approx(entry["prompt_mean"], abs=1e-9)
    assert entry["categories"] == ["shape", "count"]  # the suite's order, not sorted
    report = (tmp_path / "out" / "cats_leaderboard.md").read_text()
    assert "test_category_brightness ↑ by category (v1)" in report
    assert "| Method | Overall | Prompt mean | shape | count |" in report
    by_category = report.split("by category (v1)")[1]
    line = next(ln for ln in by_category.splitlines() if ln.startswith("| tiny CPS-4"))
    cells = [c.strip().strip("*").removeprefix("<u>").removesuffix("</u>") for c in line.split("|")[2:-1]]
    assert cells == [f"{v:.4f}" for v in (entry["value"], entry["prompt_mean"], means["shape"], means["count"])]


# ---------------------------------------------------------------- the default run


def test_run_without_arguments_runs_the_default(tmp_path, monkeypatch):
    prompts = tmp_path / "tiny_prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\n")
    monkeypatch.setattr(
        bench.plan,
        "DEFAULT_RUN",
        DefaultRun(
            methods=("tiny-teacher", "tiny-cps4"), suite=str(prompts), metrics=("brightness",), reference="tiny-teacher"
        ),
    )
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 0, result.output
    assert "default toy run: tiny-teacher, tiny-cps4 on tiny_prompts, metrics brightness, reference tiny-teacher" in (
        " ".join(result.output.split())
    )
    report = tmp_path / "bench_runs" / "tiny_prompts_leaderboard.md"
    assert report.is_file() and report.with_suffix(".json").is_file() and report.with_suffix(".png").is_file()
    assert not (tmp_path / "reports").exists()  # the committed report is rewritten only on purpose
    summary = json.loads((tmp_path / "bench_runs" / "tiny-cps4" / "tiny_prompts" / "summary.json").read_text())
    assert summary["metrics"]["brightness"]["vs_reference"]["reference"] == "tiny-teacher"
    assert "tiny CPS-4" in report.read_text()
    assert "## Claims: toy" in report.read_text() and "not checkable" in report.read_text()  # toy methods absent


def test_given_options_override_the_default_run():
    default = DefaultRun()
    assert resolve_run(None, "", "", "", None, None) == bench.plan.RunPlan(
        default.methods, default.suite, "", default.reference, default.out, default.report, True, default.claims
    )
    own_methods = resolve_run(["tiny-cps4"], "", "", "", None, None)
    assert own_methods.methods == ("tiny-cps4",) and own_methods.reference == "" and own_methods.report is None
    assert own_methods.suite == default.suite and not own_methods.default
    own_suite = resolve_run(None, "drawbench", "", "", Path("o"), None)
    assert own_suite.suite == "drawbench" and own_suite.methods == default.methods and own_suite.out == Path("o")
    assert own_suite.report is None  # the report goes to <out>/<suite>_leaderboard.md
    assert own_suite.claims == "" and resolve_run(None, "drawbench", "", "", None, None, "toy").claims == "toy"


def test_the_default_run_is_the_toy_leaderboard():
    default = bench.plan.DEFAULT_RUN
    assert default.suite == "toy-geneval-quick" and default.reference == "toy-teacher"
    with pytest.raises(ValueError, match="default reference toy-teacher is not one of the default methods"):
        DefaultRun(methods=("tiny-cps4",))
    assert default.methods[:4] == ("toy-teacher", "toy-euler4", "toy-dmd", "toy-acdmd")
    assert default.methods[4:] == tuple(
        f"toy-rtdmd{'' if arm == 'rtdmd' else '-' + arm}"
        for arm in ("rtdmd", "grpo-all-steps", "no-bp", "no-dm", "bp-only", "dmd-only")
    )
    assert default.report is None and default.out == Path("bench_runs")  # not the committed reports/toy/
    assert "toy-teacher, toy-euler4, toy-dmd, toy-acdmd, toy-rtdmd," in " ".join(
        runner.invoke(app, ["run", "--help"]).output.split()
    )


def test_set_metric_values_must_be_scalars(tmp_path, suite_file):
    @REWARDS.register("test_bad_set")
    class BadSet:
        info = RewardInfo(version="1", higher_is_better=False, differentiable=False, aggregate="set")

        def __call__(self, images, prompts, meta):
            return torch.zeros(len(prompts))

    gen = runner.invoke(
        app,
        ["generate", "--method", "tiny-cps4", "--suite", str(suite_file), "--out", str(tmp_path), "--device", "cpu"],
    )
    assert gen.exit_code == 0, gen.output
    result = runner.invoke(app, ["score", str(tmp_path / "tiny-cps4" / "cats"), "--metrics", "test_bad_set"])
    assert result.exit_code == 2 and "set metric test_bad_set returned 6 values, expected one" in result.output


EVENTS: list[str] = []


@REWARDS.register("test_built_after_init")
class BuiltAfterInit:
    """Says when it is built: a reward that places a network when built (GenEval's detector on "auto")
    must be built after the process group picked this rank's GPU."""

    info = RewardInfo(version="1", higher_is_better=True, differentiable=False)

    def __init__(self) -> None:
        EVENTS.append("reward built")

    def __call__(self, images, prompts, meta):
        return images.float().flatten(1).mean(1)


def test_score_builds_its_rewards_after_joining_the_process_group(tmp_path, suite_file, monkeypatch):
    import bench.score

    args = [
        "generate",
        "--method",
        "tiny-teacher",
        "--suite",
        str(suite_file),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert runner.invoke(app, args).exit_code == 0
    init = bench.score.distributed.init

    def spy(device):
        EVENTS.append("init")
        return init(device)

    monkeypatch.setattr(bench.score.distributed, "init", spy)
    EVENTS.clear()
    score_stage(tmp_path / "tiny-teacher" / "cats", ["test_built_after_init"], device="cpu")
    assert EVENTS == ["init", "reward built"]
