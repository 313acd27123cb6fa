"""In-training evaluation: the harness's suites, images and headline statistic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rtdmd import distributed
from rtdmd.config import ConfigError, load
from rtdmd.train.distill import build_session, train
from rtdmd.train.distill_config import DistillConfig
from rtdmd.train.evaluation import EvalTask, headline_logs


def task(categories: list[str], images_per_prompt: int) -> EvalTask:
    rows = [
        {"prompt_id": f"{i:05d}", "prompt": f"p{i}", "category": c, "metadata": "{}"} for i, c in enumerate(categories)
    ]
    return EvalTask("suite", rows, {}, images_per_prompt)


def test_headline_is_the_mean_of_category_means_for_geneval_and_the_prompt_mean_otherwise():
    # three prompts of task a, one of task b; two images each (prompt-major)
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    per_prompt = [0.5, 1.0, 0.0, 1.0]
    logs = headline_logs(task(["a", "a", "a", "b"], 2), "toy-geneval", values)
    a, b = np.mean(per_prompt[:3]), per_prompt[3]
    assert logs["eval/suite/toy-geneval"] == pytest.approx((a + b) / 2)  # GenEval's overall: tasks weigh equally
    assert logs["eval/suite/toy-geneval/a"] == pytest.approx(a) and logs["eval/suite/toy-geneval/b"] == b
    plain = headline_logs(task(["a", "a", "a", "b"], 2), "toy-clip", values)
    assert plain == {"eval/suite/toy-clip": pytest.approx(np.mean(per_prompt))}


def tiny(tmp_path, *overrides: str) -> DistillConfig:
    base = [f"run_dir={tmp_path / 'run'}", "device=cpu"]
    return load(DistillConfig, "tiny", [*base, *overrides], group="distill")


def test_the_training_evaluation_equals_the_harness_on_the_same_weights(tmp_path):
    """Same suite, prompts, seeds and EMA weights: the logged value is what `rtdmd-bench` reports."""
    from bench.aggregate import aggregate_stage
    from bench.generate import generate_stage
    from bench.methods import LoraEntry, load_method
    from bench.score import score_stage
    from rtdmd.suites import load_suite

    suite_entry = "{suite: toy-geneval-quick, metrics: [brightness, toy-geneval], num_prompts: 6, images_per_prompt: 2}"
    cfg = tiny(tmp_path, "steps=4", "eval.every=4", f"eval.suites=[{suite_entry}]", "eval.seed=3")
    train(cfg, show_progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()][-1]
    assert (tmp_path / "run" / "eval" / "toy-geneval-quick" / "step_00000004.png").exists()

    method = dataclasses.replace(
        load_method("tiny-cps4"), loras=(LoraEntry(source=str(tmp_path / "run"), kind="rtdmd"),)
    )
    suite = load_suite("toy-geneval-quick")
    out = tmp_path / "bench"
    root = generate_stage(method, suite, out, seeds=(3,), limit=6, images_per_prompt=2, device="cpu")["run_dir"]
    score_stage(root, ["brightness", "toy-geneval"], device="cpu")
    summary = aggregate_stage(root)
    harness = summary["metrics"]["brightness"]["value"]
    # the grid of each prompt's first image, from the harness's PNGs: the same pixels
    from PIL import Image

    from rtdmd.images import grid

    manifest = [json.loads(line) for line in (Path(root) / "manifest.jsonl").read_text().splitlines()]
    firsts = [r for r in manifest if r["sample_index"] == 0]
    pixels = [torch.from_numpy(np.array(Image.open(Path(root) / r["file"]).convert("RGB"))) for r in firsts]
    logged_grid = np.array(Image.open(tmp_path / "run" / "eval" / "toy-geneval-quick" / "step_00000004.png"))
    assert np.array_equal(np.array(grid(pixels, 8)), logged_grid)
    assert logged["eval/toy-geneval-quick/brightness"] == pytest.approx(harness)
    assert logged["eval/toy-geneval-quick/toy-geneval"] == pytest.approx(summary["metrics"]["toy-geneval"]["value"])
    # another run seed gives other images: the check above is not vacuous
    other = generate_stage(method, suite, tmp_path / "other", seeds=(4,), limit=6, images_per_prompt=2, device="cpu")
    score_stage(other["run_dir"], ["brightness"], device="cpu")
    assert aggregate_stage(other["run_dir"])["metrics"]["brightness"]["value"] != pytest.approx(harness, rel=1e-4)


def test_a_metric_without_its_metadata_fails_before_training(tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("a red circle\nfour cyan circles\n")
    cfg = tiny(tmp_path, f"eval.suites=[{{suite: {plain}, metrics: [toy-geneval]}}]")
    with pytest.raises(ValueError, match="needs per-prompt metadata"):
        build_session(cfg, distributed.init("cpu"), tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.suites=[]", "needs eval.suites"),
        ("eval.suites=[{suite: toy-geneval-quick, metrics: [toy-fd]}]", "scores whole sets"),
        ("eval.suites=[{suite: toy-geneval-quick, metric: [toy-clip]}]", "unknown key"),
        ("eval.suites=[{suite: toy-geneval-quick, num_prompts: -1}]", "must be >= 0"),
    ],
)
def test_bad_eval_specs_are_refused_with_the_reason(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, "eval.every=2", override)


def test_an_unknown_suite_fails_before_training_with_a_suggestion(tmp_path):
    from rtdmd.suites import SuiteError

    cfg = tiny(tmp_path, "eval.suites=[{suite: toy-geneval-quik}]")
    with pytest.raises(SuiteError, match="did you mean"):
        build_session(cfg, distributed.init("cpu"), tmp_path)


def test_the_toy_configs_evaluate_on_the_harness_suite():
    from rtdmd.train.rl_config import RLConfig

    for cls, group, name in ((DistillConfig, "distill", "toy"), (RLConfig, "rl", "toy")):
        cfg = load(cls, name, [], group=group)
        assert [s.suite for s in cfg.eval.suites] == ["toy-geneval-quick"], name
    for name in ("sd35m", "sd3m", "flux2_4b"):
        cfg = load(RLConfig, name, [], group="rl")
        assert [s.suite for s in cfg.eval.suites] == ["drawbench", "geneval"] and cfg.eval.every == 50


def test_eval_images_do_not_depend_on_the_compute_batch(tmp_path):
    from rtdmd.train.evaluation import evaluate

    suite_entry = "{suite: toy-geneval-quick, metrics: [brightness], num_prompts: 3, images_per_prompt: 2}"
    logs = []
    for batch in (1, 4):
        cfg = tiny(tmp_path, f"eval.suites=[{suite_entry}]", f"eval.compute_batch={batch}")
        sess = build_session(cfg, distributed.init("cpu"), tmp_path)
        logs.append(evaluate(sess, 0))
    assert logs[0] == logs[1]
    assert torch.isfinite(torch.tensor(logs[0]["eval/toy-geneval-quick/brightness"]))


def test_an_evaluation_between_log_steps_is_logged(tmp_path):
    """eval.every=2 with log_every=4: the step-2 evaluation gets its own stats row, not dropped."""
    overrides = [f"run_dir={tmp_path / 'run'}", "device=cpu", "steps=4", "log_every=4", "eval.every=2"]
    train(load(DistillConfig, "tiny", overrides, group="distill"), show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all("eval/toy-geneval-quick/brightness" in r for r in rows)
