"""The harness for daily use: runs that grow in one --out, `compare` across --out folders, imported
images, the metrics listing and the leaderboard's machine-readable form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.aggregate import aggregate_stage
from bench.cli import app
from bench.compare import CompareError, compare_runs
from bench.generate import generate_stage
from bench.importer import FolderImportError, import_stage, safe_id
from bench.methods import load_method
from bench.report import SCHEMA_VERSION, report_stage
from bench.runfiles import read_manifest
from bench.score import score_stage
from rtdmd.rewards import REWARDS
from rtdmd.suites import card_names, load_card, load_suite

runner = CliRunner()
TOY = "toy-rtdmd"  # a toy method: the toy world's images and metrics, seconds on a CPU
TOY_METRICS = ["toy-geneval", "toy-clip"]


@pytest.fixture(scope="module")
def suite():
    return load_suite("toy-geneval-quick")


def generate(out: Path, suite, method: str = TOY, **kw) -> dict:
    return generate_stage(load_method(method), suite, out, device="cpu", **kw)


def run_folder(out: Path, method: str = TOY) -> Path:
    return out / method / "toy-geneval-quick"


def test_a_smoke_run_grows_into_a_larger_run_and_recomputes_nothing_it_had(tmp_path, suite):
    small = generate(tmp_path, suite, limit=6, seeds=(0,))
    assert small["generated"] == 6 and small["sampling_seconds"] > 0
    first = score_stage(run_folder(tmp_path), TOY_METRICS, device="cpu")
    assert first["scored"] == 12 and first["cached"] == 0 and first["scoring_seconds"] > 0
    assert score_stage(run_folder(tmp_path), TOY_METRICS, device="cpu")["scoring_seconds"] == 0  # all cached
    before = {r["file"]: r["sha256"] for r in read_manifest(run_folder(tmp_path))}

    grown = generate(tmp_path, suite, limit=10, seeds=(1,), images_per_prompt=2)
    # the folder now holds 10 prompts x seeds {0, 1} x 2 images = 40, of which the 6 it had are reused
    assert grown["images"] == 40 and grown["generated"] == 34 and grown["skipped"] == 6
    assert any("grows from 6 prompts x seeds 0 x 1 to 10 prompts x seeds 0,1 x 2" in n for n in grown["notes"])
    manifest = read_manifest(run_folder(tmp_path))
    assert {r["file"]: r["sha256"] for r in manifest if r["file"] in before} == before
    second = score_stage(run_folder(tmp_path), TOY_METRICS, device="cpu")
    assert second["cached"] == 12 and second["scored"] == 2 * 34
    summary = aggregate_stage(run_folder(tmp_path))
    assert summary["seeds"] == [0, 1] and summary["suite"]["prompts"] == 10 and summary["images"] == 40

    again = generate(tmp_path, suite, limit=4, seeds=(0,))  # a smaller request: nothing to do, nothing dropped
    assert again["generated"] == 0 and again["images"] == 40 and again["sampling_seconds"] == 0
    assert any("more than asked" in n for n in again["notes"])
    assert len(read_manifest(run_folder(tmp_path))) == 40


def test_a_grown_folder_gives_the_images_a_fresh_full_run_gives(tmp_path, suite):
    """Growth changes nothing about an image: the same coordinates give the same bytes as a fresh run."""
    generate(tmp_path / "grown", suite, limit=3, seeds=(0,))
    generate(tmp_path / "grown", suite, limit=5, seeds=(0, 1))
    generate(tmp_path / "fresh", suite, limit=5, seeds=(0, 1))
    grown = {
        (r["prompt_id"], r["seed"], r["sample_index"]): r["sha256"]
        for r in read_manifest(run_folder(tmp_path / "grown"))
    }
    fresh = {
        (r["prompt_id"], r["seed"], r["sample_index"]): r["sha256"]
        for r in read_manifest(run_folder(tmp_path / "fresh"))
    }
    assert grown == fresh


def test_a_folder_of_another_method_config_is_refused_with_the_flag_to_use(tmp_path, prompt_file):
    out = str(tmp_path / "o")
    args = ["generate", "--suite", str(prompt_file), "--out", out, "--device", "cpu", "--limit", "2"]
    assert runner.invoke(app, [*args, "--method", "tiny-cps4"]).exit_code == 0
    card = tmp_path / "tiny-cps4.yaml"
    card.write_text(load_method_text("tiny-cps4") + "compute_batch: 2\n")  # another fingerprint
    changed = runner.invoke(app, [*args, "--method", str(card)])
    assert changed.exit_code == 2 and "anything else needs another --out" in " ".join(changed.output.split())


def load_method_text(name: str) -> str:
    from importlib import resources

    return (resources.files("bench") / "cards" / "methods" / f"{name}.yaml").read_text()


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "tiny_prompts.txt"
    path.write_text("a red circle\ntwo blue squares\na green triangle\n")
    return path


def test_compare_pairs_runs_from_different_out_folders_like_the_leaderboard(tmp_path, suite):
    """`compare A B` across two --out folders gives exactly the paired column of aggregate --reference."""
    for method in (TOY, "toy-euler4"):
        generate(tmp_path / "same", suite, method=method, limit=8)
        score_stage(run_folder(tmp_path / "same", method), TOY_METRICS, device="cpu")
    shutil.copytree(run_folder(tmp_path / "same", "toy-euler4"), run_folder(tmp_path / "other", "toy-euler4"))
    summary = aggregate_stage(run_folder(tmp_path / "same"), reference="toy-euler4")
    result = compare_runs(run_folder(tmp_path / "same"), run_folder(tmp_path / "other", "toy-euler4"))
    for metric in TOY_METRICS:
        paired = summary["metrics"][metric]["vs_reference"]
        ours = result["metrics"][metric]
        assert (ours["diff"], ours["ci_low"], ours["ci_high"], ours["p_value"]) == (
            paired["diff"],
            paired["ci_low"],
            paired["ci_high"],
            paired["p_value"],
        )
        assert ours["a"] == summary["metrics"][metric]["value"]
    cli = runner.invoke(
        app,
        ["compare", str(run_folder(tmp_path / "same")), str(run_folder(tmp_path / "other", "toy-euler4")), "--json"],
    )
    assert (
        cli.exit_code == 0
        and json.loads(cli.output)["metrics"]["toy-clip"]["diff"] == result["metrics"]["toy-clip"]["diff"]
    )


def test_compare_refuses_runs_of_different_images(tmp_path, suite):
    generate(tmp_path / "a", suite, limit=4)
    generate(tmp_path / "b", suite, limit=5)
    for out in ("a", "b"):
        score_stage(run_folder(tmp_path / out), ["toy-clip"], device="cpu")
    with pytest.raises(CompareError, match="0 only in .* 1 only in .* 4 in both"):
        compare_runs(run_folder(tmp_path / "a"), run_folder(tmp_path / "b"))


def geneval_layout(run: Path, target: Path, suite) -> None:
    """Write a run's images as GenEval's generation scripts do: <index>/samples/<k>.png + metadata.jsonl."""
    index = {row["prompt_id"]: i for i, row in enumerate(suite.rows)}
    for row in read_manifest(run):
        folder = target / f"{index[row['prompt_id']]:0>5}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        shutil.copy(run / row["file"], folder / "samples" / f"{row['sample_index']:05}.png")
        meta = {**json.loads(row["metadata"]), "prompt": row["prompt"]}
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")


def test_imported_images_give_the_leaderboard_row_generated_ones_give(tmp_path, suite):
    generate(tmp_path / "gen", suite, limit=8, images_per_prompt=2)
    generated = run_folder(tmp_path / "gen")
    geneval_layout(generated, tmp_path / "outside", suite)
    result = import_stage(tmp_path / "outside", suite, tmp_path / "imp", TOY, limit=8)
    assert result["layout"] == "geneval" and result["images"] == 16 and result["images_per_prompt"] == 2
    imported = run_folder(tmp_path / "imp")
    rows = []
    for run in (generated, imported):
        score_stage(run, TOY_METRICS, device="cpu")
        aggregate_stage(run)
        report_stage([run / "summary.json"], run / "board.md")
        rows.append(json.loads((run / "board.json").read_text())["tables"][0]["rows"][0])
    assert rows[1]["nfe"] is None and rows[0]["nfe"] == 4
    assert {k: v for k, v in rows[0].items() if k != "nfe"} == {k: v for k, v in rows[1].items() if k != "nfe"}
    board = [line for line in (imported / "board.md").read_text().splitlines() if line.startswith("| ")][1]
    assert "| – |" in board  # the NFE of imported images is not measured


def test_flat_imports_and_what_they_refuse(tmp_path, suite):
    generate(tmp_path / "gen", suite, limit=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for row in read_manifest(run_folder(tmp_path / "gen")):
        shutil.copy(
            run_folder(tmp_path / "gen") / row["file"], flat / f"{safe_id(row['prompt_id'])}_{row['sample_index']}.png"
        )
    assert import_stage(flat, suite, tmp_path / "imp", "someone-elses-model", limit=3)["layout"] == "flat"
    with pytest.raises(FolderImportError, match="113 prompt\\(s\\) of the suite have no image"):
        import_stage(flat, suite, tmp_path / "imp2", "x")  # no --limit: the whole suite is expected
    (flat / "not_a_prompt_0.png").write_bytes(b"")
    with pytest.raises(FolderImportError, match="not_a_prompt_0.png names no prompt"):
        import_stage(flat, suite, tmp_path / "imp3", "x", limit=3)


def test_a_geneval_folder_of_another_prompt_order_is_refused(tmp_path, suite):
    generate(tmp_path / "gen", suite, limit=2)
    geneval_layout(run_folder(tmp_path / "gen"), tmp_path / "outside", suite)
    meta = tmp_path / "outside" / "00001" / "metadata.jsonl"
    meta.write_text(json.dumps({"prompt": "a photo of something else"}) + "\n")
    with pytest.raises(FolderImportError, match="was the folder made from this suite"):
        import_stage(tmp_path / "outside", suite, tmp_path / "imp", "x", limit=2)


def test_every_suite_default_metric_is_registered():
    """`run --suite NAME` without --metrics resolves for every packaged suite (ocr and hpsv3_subset once exited 2)."""
    for name in card_names():
        card = load_card(name)
        assert card.default_metrics and all(m in REWARDS.names() for m in card.default_metrics), name


def test_stand_in_metrics_are_said_in_the_leaderboard(tmp_path):
    """A suite whose default metrics stand in for the benchmark's own scorer says so in every leaderboard."""
    ocr = (
        load_suite("ocr", ROOT.parent / "shared" / "prompts") if (ROOT.parent / "shared" / "prompts").exists() else None
    )
    if ocr is None:
        pytest.skip("../shared/prompts is not checked out beside the project")
    generate_stage(load_method("tiny-cps4"), ocr, tmp_path, limit=2, device="cpu")
    run = tmp_path / "tiny-cps4" / "ocr"
    score_stage(run, ["brightness"], device="cpu")
    summary = aggregate_stage(run)
    assert summary["suite"]["metric_note"] == load_card("ocr").metric_note
    report_stage([run / "summary.json"], tmp_path / "board.md")
    assert f"Metrics: {load_card('ocr').metric_note}" in (tmp_path / "board.md").read_text()
    document = json.loads((tmp_path / "board.json").read_text())
    assert document["schema_version"] == SCHEMA_VERSION and document["provenance"]["rtdmd_git"]


ROOT = Path(__file__).resolve().parents[1]


def test_listings_answer_in_json():
    metrics = json.loads(runner.invoke(app, ["metrics", "--json"]).output)
    by_name = {m["name"]: m for m in metrics}
    assert by_name["geneval"]["needs"] == ["tag", "include"] and by_name["geneval"]["aggregate"] == "category_mean"
    assert by_name["clipscore"]["differentiable"] and by_name["clipscore"]["weights"] == [
        "openai/clip-vit-large-patch14"
    ]
    assert set(by_name) == set(REWARDS.names())
    suites = json.loads(runner.invoke(app, ["suites", "--json"]).output)
    assert [s["name"] for s in suites] == card_names()
    methods = json.loads(runner.invoke(app, ["methods", "tiny-cps4", "--json"]).output)
    assert methods[0]["name"] == "tiny-cps4" and methods[0]["fingerprint"] == load_method("tiny-cps4").fingerprint()
    weights = json.loads(runner.invoke(app, ["weights", "list", "--json"]).output)
    assert {"metric": "clipscore", "source": "openai/clip-vit-large-patch14"}.items() <= weights[
        [w["metric"] for w in weights].index("clipscore")
    ].items()
    shown = runner.invoke(app, ["suites", "show", "geneval"])
    assert shown.exit_code == 0 and "available locally: yes" in shown.output
