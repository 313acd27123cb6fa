"""GenEval-format prompts from GenEval's procedure: the official evaluation file reproduced byte for
byte, and training prompts that exclude it (the real stage-2 configs' prompt source)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rtdmd.config import packaged_names
from rtdmd.data import read_prompt_records, read_source
from rtdmd.geneval.prompts import TASKS, evaluation_metadata, to_jsonl, training_metadata
from rtdmd.registry import UnknownNameError
from rtdmd.train.cli import app

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT.parent / "shared" / "prompts" / "geneval" / "evaluation_metadata.jsonl"


def test_the_evaluation_metadata_is_the_official_file():
    card = yaml.safe_load((ROOT / "rtdmd/cards/suites/geneval.yaml").read_text())
    data = to_jsonl(evaluation_metadata())
    assert hashlib.sha256(data).hexdigest() == card["files"][0]["sha256"]
    assert len(evaluation_metadata()) == card["rows"] == 553
    if UPSTREAM.exists():
        assert data == UPSTREAM.read_bytes()


def test_training_prompts_exclude_every_evaluation_prompt_and_follow_the_format():
    rows = training_metadata()
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == len(set(prompts)) > 5000
    assert not set(prompts) & {r["prompt"] for r in evaluation_metadata()}
    tags = {r["tag"] for r in rows}
    assert tags == set(TASKS) - {"single_object"}  # every single-object prompt is an evaluation prompt
    for row in rows:
        classes = [obj["class"] for obj in row["include"]]
        if row["tag"] == "counting":
            assert row["exclude"] == [{"class": classes[0], "count": row["include"][0]["count"] + 1}]
            assert 2 <= row["include"][0]["count"] <= 4
        if row["tag"] == "position":
            relation = row["include"][1]["position"]
            assert (
                relation[1] == 0
                and row["prompt"] == f"a photo of {article(classes[1])} {relation[0]} {article(classes[0])}"
            )
        if row["tag"] in ("colors", "color_attr"):
            assert "person" not in classes and all("color" in obj for obj in row["include"])
    assert training_metadata() == rows and training_metadata(seed=1) != rows
    with pytest.raises(ValueError, match="evaluation"):
        training_metadata(seed=43)


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def test_the_real_stage_two_configs_pin_the_generated_prompts():
    data = read_source("generated:geneval-train.jsonl")
    assert data == to_jsonl(training_metadata())
    digest = hashlib.sha256(data).hexdigest()
    real = [n.removeprefix("rl/") for n in packaged_names("rl") if n not in ("rl/tiny", "rl/toy")]
    assert len(real) == 5
    for name in real:
        cfg = yaml.safe_load((ROOT / "rtdmd/configs/rl" / f"{name}.yaml").read_text())
        assert (cfg["prompt_file"], cfg["prompt_file_sha256"]) == ("generated:geneval-train.jsonl", digest), name
    records = read_prompt_records("generated:geneval-train.jsonl", digest)
    assert json.loads(data.decode().splitlines()[0]) == records[0]
    with pytest.raises(UnknownNameError, match="geneval-train.jsonl"):
        read_source("generated:geneval-trian.jsonl")


def test_the_dry_run_resolves_the_training_prompts_without_a_file():
    result = CliRunner().invoke(app, ["rl", "--config", "sd35m", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert (
        f"# {len(training_metadata())} training prompts from generated:geneval-train.jsonl, sha256 verified"
        in result.output
    )
    result = CliRunner().invoke(app, ["rl", "--config", "sd35m", "--dry-run", "prompt_file_sha256=00"])
    assert result.exit_code == 2 and "sha256" in result.output
