"""Inputs that used to give a wrong leaderboard with exit 0: each now gives the right answer or one
clear line (exit 2) naming the file and what to do. Also several run seeds in one run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from rtdmd.rewards import REWARDS
from rtdmd.rewards.base import RewardInfo

runner = CliRunner()
PROMPTS = [("a red circle", "shape"), ("a cat", "animal"), ("two blue squares", "shape"), ("a dog", "animal")]


@REWARDS.register("test_nan_on_cats")
class NanOnCats:
    """Mean pixel value, except NaN for prompts that mention a cat."""

    info = RewardInfo(version="1", higher_is_better=True, differentiable=False)

    def __call__(self, images, prompts, meta):
        values = images.float().flatten(1).mean(1)
        return torch.where(torch.tensor(["cat" in p for p in prompts]), torch.nan, values)


@REWARDS.register("test_faults_category")
class CategoryLuma:
    info = RewardInfo(version="1", higher_is_better=True, differentiable=False, aggregate="category_mean")

    def __call__(self, images, prompts, meta):
        return images.float().flatten(1).mean(1)


def text(result) -> str:
    """The output as one line, without the box typer draws around usage errors."""
    return " ".join(result.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def refused(args: list[str], message: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in text(result), text(result)
    assert "Traceback" not in result.output
    return text(result)


@pytest.fixture
def suite(tmp_path) -> Path:
    path = tmp_path / "pets.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in PROMPTS))
    return path


def generate(suite: Path, out: Path, *extra: str) -> Path:
    ok(["generate", "--method", "tiny-cps4", "--suite", str(suite), "--out", str(out), "--device", "cpu", *extra])
    return out / "tiny-cps4" / "pets"


def test_a_non_finite_score_is_refused_when_computed_and_never_cached(tmp_path, suite):
    root = generate(suite, tmp_path / "out")
    refused(
        ["score", str(root), "--metrics", "test_nan_on_cats", "--device", "cpu"],
        "metric test_nan_on_cats gave nan for image images/seed0/00001_0.png (prompt 00001: 'a cat')",
    )
    for path in root.glob("scores*.jsonl"):
        assert all(json.loads(line)["score"] == json.loads(line)["score"] for line in path.read_text().splitlines())
    # a NaN that reached the cache some other way is computed again, and refused by aggregate until then
    ok(["score", str(root), "--metrics", "brightness", "--device", "cpu"])
    rows = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    good = rows[0]["score"]
    rows[0]["score"] = float("nan")
    (root / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(["aggregate", str(root)], "brightness score of prompt 00000 is nan: run `rtdmd-bench score")
    again = ok(["score", str(root), "--metrics", "brightness", "--device", "cpu"])
    assert re.search(r"1 scores computed in [\d.]+ s \([\d.]+ scores/s after loading\), 3 reused", text(again))
    assert json.loads((root / "scores.jsonl").read_text().splitlines()[0])["score"] == good
    summary = ok(["aggregate", str(root)])
    assert "nan" not in text(summary).lower()


def test_a_torn_manifest_line_is_refused_then_repaired_by_generate(tmp_path, suite):
    root = generate(suite, tmp_path / "out")
    ok(["score", str(root), "--metrics", "brightness", "--device", "cpu"])
    manifest, scores = (root / "manifest.jsonl").read_bytes(), (root / "scores.jsonl").read_bytes()
    (root / "manifest.jsonl").write_bytes(manifest[: len(manifest) - 40])  # what a kill mid-write leaves
    where, repair = "manifest.jsonl line 4 is not valid JSON", "): run `rtdmd-bench generate` (or `run`) again"
    for args in (["score", str(root), "--metrics", "brightness", "--device", "cpu"], ["aggregate", str(root)]):
        assert repair in refused(args, where)
    assert (root / "scores.jsonl").read_bytes() == scores  # the torn row's cached score was not deleted
    repaired = generate(suite, tmp_path / "out")
    assert (repaired / "manifest.jsonl").read_bytes() == manifest
    assert "0 scores computed, 4 reused" in text(ok(["score", str(root), "--metrics", "brightness"]))


def test_a_manifest_missing_a_whole_row_is_refused(tmp_path, suite):
    root = generate(suite, tmp_path / "out")
    ok(["score", str(root), "--metrics", "brightness", "--device", "cpu"])
    lines = (root / "manifest.jsonl").read_text().splitlines(keepends=True)
    (root / "manifest.jsonl").write_text("".join(lines[:-1]))
    refused(["aggregate", str(root)], "manifest.jsonl holds 3 images, not 4 prompts x 1 seed(s) x 1: run `rtdmd-bench")
    config = (root / "config.yaml").read_text()
    (root / "config.yaml").write_text("\n".join(ln for ln in config.splitlines() if not ln.startswith("prompts:")))
    refused(["aggregate", str(root)], "was generated by an older rtdmd (its config.yaml has no prompt count or seeds)")


def test_scores_of_an_older_metric_version_are_refused(tmp_path, suite):
    root = generate(suite, tmp_path / "out")
    ok(["score", str(root), "--metrics", "brightness", "--device", "cpu"])
    rows = [json.loads(line) | {"version": "0"} for line in (root / "scores.jsonl").read_text().splitlines()]
    (root / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    version = REWARDS.get("brightness").info.version
    refused(
        ["aggregate", str(root)],
        f"brightness was scored at version 0, the metric is now version {version}: run `rtdmd-bench score {root} "
        "--metrics brightness` to rescore",
    )
    assert re.search(
        r"4 scores computed in [\d.]+ s .*, 0 reused", text(ok(["score", str(root), "--metrics", "brightness"]))
    )
    ok(["aggregate", str(root)])


def test_runs_of_one_method_are_labelled_by_their_seeds(tmp_path, suite):
    """Two runs of tiny-cps4 with seeds 0 and 1: two rows that say which is which, each with its own
    numbers in every table; a claim about tiny-cps4 is then ambiguous and refused."""
    runs = [generate(suite, tmp_path / "a"), generate(suite, tmp_path / "b", "--seeds", "1")]
    summaries = []
    for root in runs:
        ok(["score", str(root), "--metrics", "brightness,test_faults_category", "--device", "cpu"])
        ok(["aggregate", str(root)])
        summaries.append(json.loads((root / "summary.json").read_text()))
    out = tmp_path / "report.md"
    ok(["report", *(str(r / "summary.json") for r in runs), "--out", str(out)])
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| tiny CPS-4")]
    labels = ["tiny CPS-4 (eta 0.9) (seed 0)", "tiny CPS-4 (eta 0.9) (seed 1)"]
    assert [r.split(" | ")[0].removeprefix("| ") for r in rows] == labels * 2  # leaderboard, category table
    main, category = rows[:2], rows[2:]
    for line, summary in zip(main, summaries, strict=True):
        assert f"{summary['metrics']['brightness']['value']:.4f}" in line
    assert sum(line.count("**") for line in main) == 2 * 2  # one best per metric column
    for line, summary in zip(category, summaries, strict=True):
        entry = summary["metrics"]["test_faults_category"]
        cells = [c.strip().strip("*").removeprefix("<u>").removesuffix("</u>") for c in line.split("|")[2:-1]]
        expected = [
            entry["value"],
            entry["prompt_mean"],
            entry["per_category"]["shape"],
            entry["per_category"]["animal"],
        ]
        assert cells == [f"{v:.4f}" for v in expected]
    assert summaries[0]["metrics"]["brightness"]["value"] != summaries[1]["metrics"]["brightness"]["value"]
    card = tmp_path / "claims.yaml"
    card.write_text(
        "name: c\ndescription: d\nsuites: [pets]\nclaims:\n  - text: bright\n    left: {method: tiny-cps4, metric: brightness}"
        "\n    op: '>'\n    right: {value: 0.1}\n"
    )
    refused(
        ["report", *(str(r / "summary.json") for r in runs), "--out", str(out), "--claims", str(card)],
        "method tiny-cps4 has 2 runs in this report",
    )
    old = summaries[0] | {"seed": 0}
    del old["seeds"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    refused(
        ["report", str(tmp_path / "old.json")], "old.json was written by an older rtdmd: run `rtdmd-bench aggregate`"
    )


def test_several_seeds_in_one_run(tmp_path, suite):
    args = ["--method", "tiny-cps4", "--method", "tiny-teacher", "--reference", "tiny-teacher", "--suite", str(suite)]
    ok(["run", *args, "--metrics", "brightness", "--seeds", "0,1", "--out", str(tmp_path / "two"), "--device", "cpu"])
    ok(["run", *args, "--metrics", "brightness", "--seeds", "1", "--out", str(tmp_path / "one"), "--device", "cpu"])
    root = tmp_path / "two" / "tiny-cps4" / "pets"
    assert len(list((root / "images" / "seed0").glob("*.png"))) == len(list((root / "images" / "seed1").glob("*.png")))
    both = json.loads((root / "summary.json").read_text())
    alone = json.loads((tmp_path / "one" / "tiny-cps4" / "pets" / "summary.json").read_text())
    entry = both["metrics"]["brightness"]
    assert both["seeds"] == [0, 1] and both["images"] == 8 and entry["n_seeds"] == 2
    assert entry["per_seed"]["1"] == alone["metrics"]["brightness"]["value"]  # seed 1's images are the same
    assert entry["value"] == pytest.approx((entry["per_seed"]["0"] + entry["per_seed"]["1"]) / 2, abs=1e-12)
    assert entry["vs_reference"]["n_prompts"] == 4
    report = (tmp_path / "two" / "pets_leaderboard.md").read_text()
    assert "4 prompts × 1 images × 2 seeds (0,1)" in report and "Per run seed" in report
    per_seed = report.split("Per run seed")[1]
    row = next(line for line in per_seed.splitlines() if line.startswith("| tiny CPS-4"))
    a, b = entry["per_seed"]["0"], entry["per_seed"]["1"]
    assert f"{a:.4f} / {b:.4f} ± {abs(a - b) / 2**0.5:.4f}" in row  # the sample standard deviation of two values


@pytest.mark.parametrize(
    "args, message",
    [
        (["--limit", "-120"], "Invalid value for '--limit': Input should be greater than or equal to 0"),
        (
            ["--images-per-prompt", "-1"],
            "Invalid value for '--images-per-prompt': Input should be greater than or equal to 0",
        ),
        (["--seeds", "a"], "'a': give run seeds as integers, e.g. 0 or 0,1,2"),
        (["--seeds", "0,-1"], "'0,-1': run seeds must be distinct and >= 0"),
        (["--seeds", "1,1"], "'1,1': run seeds must be distinct and >= 0"),
        (["--device", "gpu"], "unknown device 'gpu': use auto | cpu | cuda | cuda:N"),
    ],
)
def test_bad_numeric_and_device_options_are_refused_before_any_work(tmp_path, suite, args, message):
    refused(["generate", "--method", "tiny-cps4", "--suite", str(suite), "--out", str(tmp_path), *args], message)
    assert not (tmp_path / "tiny-cps4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, suite):
    refused(
        ["generate", "--method", "tiny-cps4", "--suite", str(suite), "--out", str(tmp_path), "--device", "cuda"],
        "device cuda: no CUDA device is available here",
    )
    from rtdmd.train.cli import app as train_app

    for device, message in (("cuda:1", "no CUDA device is available here"), ("gpu", "unknown device 'gpu'")):
        result = runner.invoke(
            train_app, ["sample", "--config", "tiny", f"run_dir={tmp_path / 's'}", f"device={device}"]
        )
        assert result.exit_code == 2 and message in text(result)
        assert not (tmp_path / "s").exists()  # nothing left behind: the corrected command starts afresh


def test_schedules_refuses_steps_and_resolutions_out_of_range():
    refused(["schedules", "--steps", "0", "--default-spacing"], "Invalid value for '--steps' / '-n'")
    refused(["schedules", "--resolution", "8"], "Invalid value for '--resolution' / '-r'")


def test_compare_runs_counts_differing_images_and_score_gaps(tmp_path, suite):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "tools/compare_runs.py")
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    args = ["run", "--method", "tiny-cps4", "--suite", str(suite), "--metrics", "brightness", "--device", "cpu"]
    for out in ("a", "b"):
        ok([*args, "--out", str(tmp_path / out)])
    same = compare_runs.compare(tmp_path / "a", tmp_path / "b")
    run = same["runs"]["tiny-cps4/pets"]
    assert run["images_differing"] == 0 and run["value_gap"] == {"brightness": 0.0}
    assert same["leaderboards_identical"] == {"pets_leaderboard.md": True}
    root = tmp_path / "b" / "tiny-cps4" / "pets"
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    rows[1]["sha256"] = "0" * 64  # as if image 1 had come out differently
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    scores[0]["score"] += 0.25
    (root / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    changed = compare_runs.compare(tmp_path / "a", tmp_path / "b")["runs"]["tiny-cps4/pets"]
    assert changed["images_differing"] == 1
    assert changed["score_gap_on_identical_images"]["brightness"] == pytest.approx(0.25)
