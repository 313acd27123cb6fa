"""Registry, seeding, checkpoints, run directories, loggers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
import yaml

from rtdmd import run_dir
from rtdmd.checkpoint import load_tensors, save_tensors
from rtdmd.config import ConfigError
from rtdmd.files import write_text_atomic
from rtdmd.loggers import JsonlLogger
from rtdmd.registry import Registry, UnknownNameError
from rtdmd.seeding import randn, randn_rows, seed_for
from rtdmd.train.sample import SampleConfig


def test_registry_did_you_mean():
    reg: Registry[int] = Registry("reward")
    reg.register("pickscore")(1)
    reg.register("hpsv2")(2)
    assert reg.get("pickscore") == 1 and reg.names() == ("hpsv2", "pickscore") and "hpsv2" in reg
    with pytest.raises(
        UnknownNameError, match=r"unknown reward 'pickscor' \(did you mean 'pickscore'\?\); known: hpsv2, pickscore"
    ):
        reg.get("pickscor")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("hpsv2")(3)


def test_seed_for_is_stable_typed_and_spread():
    assert seed_for(0, "geneval/0001", 3, -1) == seed_for(0, "geneval/0001", 3, -1)
    assert seed_for(1) != seed_for("1")
    assert 0 <= seed_for(2**70, "x") < 2**63
    seeds = {seed_for(0, f"p{i}", k) for i in range(100) for k in range(10)}
    assert len(seeds) == 1000
    with pytest.raises(TypeError):
        seed_for(0.5)
    # stable across processes (Python's hash() is not)
    code = "from rtdmd.seeding import seed_for; print(seed_for(7, 'a', 1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(out) == seed_for(7, "a", 1)
    # the reference value pins the hashing scheme: changing it would change every image
    assert seed_for(0, "p", 0, -1) == int.from_bytes(hashlib.sha256(b'[0,"p",0,-1]').digest()[:8], "little") % 2**63


def test_noise_is_drawn_on_cpu_float32_and_is_row_independent():
    a = randn(123, (2, 3))
    assert a.dtype == torch.float32 and torch.equal(a, randn(123, (2, 3)))
    rows = randn_rows([5, 6], (4,))
    assert torch.equal(rows[1], randn(6, (4,)))


def test_checkpoint_round_trip_and_atomic_overwrite(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tensors, path, metadata={"step": "1"})
    loaded = load_tensors(path)
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])

    import rtdmd.checkpoint as ck

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_tensors({"w": torch.zeros(1)}, path)
    assert torch.equal(load_tensors(path)["w"], tensors["w"])  # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp files left
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "nope.safetensors")
    write_text_atomic(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_run_dir_records_config_and_environment_then_resumes_or_refuses(tmp_path):
    cfg = SampleConfig(prompts=("a",), run_dir=str(tmp_path / "run"))
    root = run_dir.prepare(cfg.run_dir, cfg)
    assert yaml.safe_load((root / "config.yaml").read_text())["prompts"] == ["a"]
    env = json.loads((root / "env.json").read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] and "git" in env and "argv" in env
    run_dir.prepare(cfg.run_dir, cfg)  # same config: resume
    assert len(json.loads((root / "env.json").read_text())["resumed"]) == 1
    other = SampleConfig(prompts=("b",), run_dir=cfg.run_dir)
    with pytest.raises(ConfigError, match=r"holds a different config \(prompts: \['a'\] -> \['b'\]\)"):
        run_dir.prepare(cfg.run_dir, other)


def test_jsonl_logger(tmp_path):
    logger = JsonlLogger(tmp_path / "stats.jsonl")
    logger.log(1, {"loss/g": torch.tensor(0.5), "loss/nan": float("nan")})
    logger.log(2, {"loss/g": 0.25})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss/g"] == 0.5 and rows[0]["loss/nan"] == "nan"


def test_status_line_shows_selected_metrics():
    from io import StringIO

    from rich.console import Console

    from rtdmd.loggers import Loggers, StatusLine

    buffer = StringIO()
    status = StatusLine(total=4, description="distill", keys=("loss/g",), console=Console(file=buffer, width=120))
    logs = Loggers(status)
    logs.log(2, {"loss/g": 0.123456, "loss/other": 1.0})
    logs.close()
    assert "g=0.1235" in buffer.getvalue() and "2/4" in buffer.getvalue()
