"""The import contracts of pyproject.toml (``[tool.importlinter]``): layers import only downward, the
library never imports the harness, no cycles between sibling modules. Each contract is also shown to
catch a planted violation in a scratch copy of the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # ahead of the installed (editable) copy
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", script, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True
    )


def test_the_tree_keeps_every_import_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        ("rtdmd/flow/path.py", "import rtdmd.train.loop", "rtdmd: layers import downward only"),
        ("rtdmd/rewards/base.py", "import rtdmd.toyworld.world", "rtdmd: layers import downward only"),
        ("rtdmd/backbones/base.py", "import rtdmd.rewards.base", "rtdmd: layers import downward only"),
        ("rtdmd/train/state.py", "import bench.report", "the library never imports the harness"),
        ("bench/generate.py", "import bench.report", "bench: CLI on top"),
        ("rtdmd/train/roles.py", "import rtdmd.train.distill", "no import cycles between sibling modules"),
    ],
)
def test_a_planted_violation_breaks_its_contract(tmp_path, module, planted, broken):
    for name in ("rtdmd", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{planted}  # planted\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-4000:]
    assert f"{broken}" in result.stdout.split("Broken contracts")[-1], result.stdout[-4000:]
