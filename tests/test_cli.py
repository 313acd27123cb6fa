"""The command lines, end to end on the tiny backbone."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.cli import app as bench_app
from rtdmd.train.cli import app as train_app

runner = CliRunner()


def sample(*args: str):
    return runner.invoke(train_app, ["sample", *args])


def text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_sample_tiny_writes_a_resumable_run_directory(tmp_path):
    run = tmp_path / "run"
    first = sample("--config", "tiny", f"run_dir={run}", "images_per_prompt=2", "height=32", "width=32")
    assert first.exit_code == 0, first.output
    assert "6 generated, 0 already done" in text(first) and "measured NFE/image 4" in text(first)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((run / r["file"]).exists() for r in rows)
    assert (run / "grid.png").exists() and (run / "config.yaml").exists() and (run / "env.json").exists()

    # a killed run: one image lost -> the rerun regenerates exactly that one, bit for bit
    lost = run / rows[3]["file"]
    lost.unlink()
    again = sample("--config", "tiny", f"run_dir={run}", "images_per_prompt=2", "height=32", "width=32")
    assert again.exit_code == 0, again.output
    assert "1 generated, 5 already done" in text(again)
    rows_again = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert rows_again == rows

    changed = sample("--config", "tiny", f"run_dir={run}", "images_per_prompt=2", "height=32", "width=32", "seed=1")
    assert changed.exit_code == 2 and "holds a different config (seed: 0 -> 1)" in text(changed)


def test_dry_run_prints_the_resolved_config_without_loading(tmp_path):
    result = sample("--config", "tiny", "--dry-run", "sampler.eta=0.0", f"run_dir={tmp_path / 'x'}")
    assert result.exit_code == 0, result.output
    assert "eta: 0.0" in result.output and "family: tiny" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.etaa=0.5", "sampler.etaa: unknown key (did you mean 'eta'?)"),
        ("sampler.num_steps=four", "sampler.num_steps: expected int, got 'four' (e.g. sampler.num_steps=4)"),
        ("backbone.family=sd33", "unknown backbone family 'sd33' (did you mean 'sd3'?)"),
        ("sampler.timesteps=[1.0, 0.5]", "timesteps has 2 entries for num_steps=4"),
        ("height=60", "tiny: height and width must be positive multiples of 8, got 60x64"),
    ],
)
def test_config_errors_exit_2_with_a_clear_message(override, message):
    result = sample("--config", "tiny", "--dry-run", override)
    assert result.exit_code == 2
    assert message in text(result)


def test_configs_lists_packaged_configs():
    result = runner.invoke(train_app, ["configs"])
    assert result.exit_code == 0 and "sample/tiny" in result.output


def test_bench_schedules_prints_the_method_table():
    result = runner.invoke(bench_app, ["schedules", "-r", "512"])
    assert result.exit_code == 0, result.output
    assert "1.0000, 0.9581, 0.8840, 0.7175, 0.0000" in result.output  # FLUX.2-klein at 512 px
    assert "1.0000, 0.8492, 0.6525, 0.3849, 0.0000" in result.output  # FLUX.1 at 512 px
    bad = runner.invoke(bench_app, ["schedules", "-n", "8"])
    assert bad.exit_code == 2


@pytest.mark.parametrize(
    ("family", "builder", "guidance"),
    [
        ("sd3", "tiny_sd3_pipeline", 4.5),
        ("flux1", "tiny_flux1_pipeline", 3.5),
        ("flux2", "tiny_flux2_klein_pipeline", 4.0),
    ],
)
def test_sample_a_real_family_from_a_local_directory(tmp_path, family, builder, guidance):
    """The same command line drives a real family, loaded with from_pretrained from a local directory."""
    import rtdmd.testing

    source = tmp_path / "weights"
    getattr(rtdmd.testing, builder)().save_pretrained(source)
    result = sample(
        "--config",
        "tiny",
        f"backbone.family={family}",
        f"backbone.source={source}",
        "backbone.max_sequence_length=16",
        "sampler.eta=0.0",
        "sampler.num_steps=3",
        "sampler.timesteps=none",
        f"sampler.guidance={guidance}",
        "images_per_prompt=1",
        "height=32",
        "width=32",
        f"run_dir={tmp_path / 'run'}",
    )
    assert result.exit_code == 0, result.output
    nfe = 3 if family == "flux1" else 6  # FLUX.1-dev's guidance is embedded: no second branch
    assert "3 generated, 0 already done" in text(result) and f"measured NFE/image {nfe}" in text(result)
