"""`rtdmd-bench weights list | fetch` and the `--weights-dir` root."""

import os

from typer.testing import CliRunner

from bench.cli import app
from rtdmd.testing import save_tiny_clip

runner = CliRunner()


def test_list_shows_each_metrics_files_and_where_they_were_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "400")
    save_tiny_clip(tmp_path / "openai/clip-vit-large-patch14")
    result = runner.invoke(app, ["weights", "list", "--weights-dir", str(tmp_path)], terminal_width=400)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert str(tmp_path / "openai/clip-vit-large-patch14") in rows["clipscore"]
    assert "missing" in rows["pickscore"] and "PickScore_v1" in result.output
    assert "sac+logos+ava1-l14-linearMSE.pth" in result.output


def test_fetch_refuses_unknown_metrics_and_offline_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["weights", "fetch", "brightness", "--weights-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no downloadable weights" in result.output
    result = runner.invoke(app, ["weights", "fetch", "clipscore", "--weights-dir", str(tmp_path)])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.output


def test_fetch_skips_files_already_present(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    save_tiny_clip(tmp_path / "openai/clip-vit-large-patch14")
    result = runner.invoke(app, ["weights", "fetch", "clipscore", "--weights-dir", str(tmp_path)], terminal_width=400)
    assert result.exit_code == 0 and "already in" in result.output


def test_the_global_weights_dir_option_sets_the_root_for_every_metric(tmp_path, monkeypatch):
    monkeypatch.delenv("RTDMD_WEIGHTS", raising=False)
    result = runner.invoke(app, ["--weights-dir", str(tmp_path), "suites"])
    assert result.exit_code == 0, result.output
    assert os.environ.pop("RTDMD_WEIGHTS") == str(tmp_path)
