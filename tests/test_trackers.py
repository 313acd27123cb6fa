"""Training logs where researchers look: TensorBoard event files and an offline W&B run written by a tiny
training run (the same scalars as stats.jsonl, the evaluation's grids as images), trackio where it
installs, and `rtdmd-train plot`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from rtdmd.config import ConfigError, load
from rtdmd.trackers import TRACKERS, TrackConfig, TrackerError, open_trackers
from rtdmd.train.cli import app
from rtdmd.train.distill_config import DistillConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, monkeypatch_module):
    """A 4-step tiny distillation that evaluates at steps 2 and 4, logging to TensorBoard and offline W&B."""
    root = tmp_path_factory.mktemp("tracked") / "run"
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    monkeypatch_module.setenv("WANDB_DISABLE_GIT", "true")
    args = ["distill", "--config", "tiny", f"run_dir={root}", "device=cpu", "log.trackers=[tensorboard,wandb]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def stats_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "stats.jsonl").read_text().splitlines()]


def test_tensorboard_holds_the_scalars_of_stats_jsonl_and_the_eval_grids(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = stats_rows(tracked_run)
    for key in ("loss/generator", "loss/fake", "eval/toy-geneval-quick/brightness"):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert logged, key
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged], key
    grids = events.Images("samples/toy-geneval-quick")
    assert [g.step for g in grids] == [2, 4]
    assert (grids[0].width, grids[0].height) == Image.open(
        tracked_run / "eval/toy-geneval-quick/step_00000002.png"
    ).size


def wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-log framing in 32 KiB blocks
    (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def test_wandb_offline_run_holds_the_scalars_of_stats_jsonl_and_the_eval_grids(tracked_run):
    from wandb.proto import wandb_internal_pb2

    (run,) = sorted((tracked_run / "wandb").glob("offline-run-*"))
    history = {}
    for raw in wandb_records(next(run.glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = items
    rows = stats_rows(tracked_run)
    assert sorted(history) == [r["step"] for r in rows]
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time"):
                assert history[row["step"]][key] == pytest.approx(value, rel=1e-6), (row["step"], key)
    grids = {
        step: items["samples/toy-geneval-quick/path"]
        for step, items in history.items()
        if "samples/toy-geneval-quick/path" in items
    }
    assert sorted(grids) == [2, 4] and all((run / "files" / path).is_file() for path in grids.values())


def test_trackio_logs_locally_where_it_installs(tmp_path):
    """In a subprocess: trackio fixes its folder (TRACKIO_DIR) when it is first imported."""
    pytest.importorskip("trackio")
    code = (
        "from pathlib import Path\n"
        "from rtdmd.trackers import TrackConfig, open_trackers\n"
        "(t,) = open_trackers(TrackConfig(trackers=('trackio',), project='rtdmd-test'), Path('run'), {'a': 1})\n"
        "t.log(1, {'loss/x': 0.5, 'note': 'text is skipped'})\n"
        "t.log(2, {'loss/x': 0.25})\n"
        "t.close()\n"
    )
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (database,) = (tmp_path / "trackio").glob("rtdmd-test*.db")
    rows = sqlite3.connect(database).execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    assert [(step, json.loads(metrics)["loss/x"]) for step, metrics in rows] == [(1, 0.5), (2, 0.25)]


def test_an_unknown_or_missing_tracker_stops_before_training(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="tensorbord"):
        load(DistillConfig, "tiny", [f"run_dir={tmp_path}", "log.trackers=[tensorbord]"], group="distill")
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "wandb" else real(name, *a),
    )
    with pytest.raises(TrackerError, match=r"pip install 'rtdmd\[trackers\]'"):
        open_trackers(TrackConfig(trackers=("tensorboard", "wandb")), tmp_path, {})
    assert not (tmp_path / "tensorboard").exists()  # nothing opened before every import was checked
    assert set(TRACKERS.names()) == {"tensorboard", "wandb", "trackio"}


def test_plot_draws_every_logged_panel(tracked_run, tmp_path):
    result = runner.invoke(app, ["plot", str(tracked_run), "--out", str(tmp_path / "stats.png")])
    assert result.exit_code == 0, result.output
    from rtdmd.train.plot import panel_keys, series

    panels = panel_keys(list(series(stats_rows(tracked_run))))
    assert [title for title, _ in panels] == ["loss", "gradient norm", "evaluation", "seconds per step"]
    image = Image.open(tmp_path / "stats.png")
    assert image.size[1] > 4 * 200  # four panels
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "stats.jsonl").write_text('{"step": 1, "time": 0}\n')
    failed = runner.invoke(app, ["plot", str(empty)])
    assert failed.exit_code == 2 and "holds no losses" in failed.output
