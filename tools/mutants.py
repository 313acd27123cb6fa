"""Plant each mistake of tools/mutants.yaml in a scratch copy of the working tree and run the fast
tests against it: a mutant the tests do not kill is a hole in the tests.

    python tools/mutants.py                 # every mutant
    python tools/mutants.py s1-swap s2-ppo  # some of them
    python tools/mutants.py --list

Each mutant replaces one exact snippet (which must occur exactly once) in one file. The scratch copy
(tracked and untracked, not ignored files) is made once; every mutant is applied, tested with
``pytest -x`` on the yaml's ``tests`` (or the mutant's own ``tests``) and undone. The unmutated copy
must pass every test file named first. Exit status 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=max(Console().width, 140))


def load(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    ids = [m["id"] for m in spec["mutants"]]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"{path}: mutant ids repeat")
    for m in spec["mutants"]:
        text = (ROOT / m["file"]).read_text()
        if text.count(m["old"]) != 1:
            raise SystemExit(
                f"mutant {m['id']}: its snippet occurs {text.count(m['old'])} times in {m['file']}, not once"
            )
    return spec


def scratch_copy() -> Path:
    """The working tree's tracked and untracked (not ignored) files, in a fresh directory."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    target = Path(tempfile.mkdtemp(prefix="rtdmd-mutants-"))
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def run_tests(copy: Path, tests: list[str], timeout_s: float) -> tuple[bool, float, str]:
    """(passed, seconds, the first failure's line) of ``pytest -x`` in ``copy``, importing its code."""
    env = os.environ | {"PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env |= {"HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]
    start = time.perf_counter()
    try:
        done = subprocess.run([*command, *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, f"timed out after {timeout_s:.0f} s"
    failed = next((line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    return done.returncode == 0, time.perf_counter() - start, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    parser.add_argument("--spec", type=Path, default=ROOT / "tools" / "mutants.yaml")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    args = parser.parse_args()
    spec = load(args.spec)
    mutants = [m for m in spec["mutants"] if not args.ids or m["id"] in args.ids]
    if unknown := set(args.ids) - {m["id"] for m in spec["mutants"]}:
        raise SystemExit(f"unknown mutant id(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in mutants:
            console.print(f"[bold]{m['id']}[/] ({m['file']}): {m['what']}")
        return
    start = time.perf_counter()
    copy = scratch_copy()
    try:
        every_file = sorted({*spec["tests"], *(t for m in mutants for t in m.get("tests", ()))})
        passed, seconds, failure = run_tests(copy, every_file, args.timeout)
        if not passed:
            raise SystemExit(f"the unmutated copy fails its tests ({failure}): fix that first")
        console.print(f"unmutated copy: tests pass in {seconds:.0f} s")
        table = Table("mutant", "what", "verdict", "s", "killed by")
        survivors = []
        for m in mutants:
            path = copy / m["file"]
            original = path.read_text()
            path.write_text(original.replace(m["old"], m["new"]))
            try:
                passed, seconds, failure = run_tests(copy, m.get("tests", spec["tests"]), args.timeout)
            finally:
                path.write_text(original)
            if passed:
                survivors.append(m["id"])
            verdict = "[red]SURVIVED[/]" if passed else "killed"
            table.add_row(m["id"], m["what"], verdict, f"{seconds:.0f}", failure.removeprefix("FAILED ")[:70])
            console.print(f"{m['id']}: {'SURVIVED' if passed else 'killed'} ({seconds:.0f} s)")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    console.print(table)
    console.print(
        f"{len(mutants) - len(survivors)} of {len(mutants)} mutants killed in {time.perf_counter() - start:.0f} s"
        + (f"; survivors: {', '.join(survivors)}" if survivors else "")
    )
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
