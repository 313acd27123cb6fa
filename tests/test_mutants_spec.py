"""tools/mutants.yaml stays applicable: each planted mistake's snippet occurs exactly once in its file, the
mistake changes it, and the test files it names exist. Without this, a refactor silently turns a mutant
into an abort of `tox -e mutants` (the spec is checked whole before any mutant runs)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "tools" / "mutants.yaml").read_text())


def test_every_mutant_snippet_occurs_once_and_the_mutation_changes_it():
    stale = []
    for m in SPEC["mutants"]:
        count = (ROOT / m["file"]).read_text().count(m["old"])
        if count != 1 or m["old"] == m["new"]:
            stale.append(f"{m['id']}: {count} occurrences in {m['file']}")
    assert not stale, "stale mutants (update tools/mutants.yaml to the code):\n" + "\n".join(stale)


def test_mutant_ids_are_unique_and_their_tests_exist():
    ids = [m["id"] for m in SPEC["mutants"]]
    assert len(ids) == len(set(ids))
    named = {*SPEC["tests"], *(t for m in SPEC["mutants"] for t in m.get("tests", ()))}
    missing = sorted(t for t in named if not (ROOT / t.split("::")[0]).exists())
    assert not missing, missing
