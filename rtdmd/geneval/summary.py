"""GenEval results files: the per-image rows of the official ``evaluate_images.py`` and the text of its
``summary_scores.py``, with a JSON of the same numbers.

A row holds ``filename, tag, prompt, correct, reason, metadata`` (the prompt's metadata as a JSON
string: prompts are grouped by this string, as pandas' ``groupby('metadata')``), ``details`` (per
kept class, ``[x1, y1, x2, y2, score]`` rows, a JSON string) and the RL repositories' variants
``strict_correct`` and ``partial``. The official ``summary_scores.py`` reads these rows unchanged.

Summary numbers (:func:`rtdmd.geneval.judge.summarize`):

* ``% correct images`` = mean over rows of ``correct``;
* ``% correct prompts`` = mean over distinct metadata strings of ``any(correct)``;
* per task (tags in order of first appearance): ``sum(correct) / rows``;
* ``Overall score`` = the unweighted mean of the task means (5 decimals): the GenEval score.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rtdmd.files import write_text_atomic
from rtdmd.geneval.judge import Verdict, summarize


def result_row(filename: str, metadata: dict, verdict: Verdict, details: dict | None = None) -> dict:
    """One image's row: the official columns, then ``strict_correct`` and ``partial``."""
    return {
        "filename": str(filename),
        "tag": metadata["tag"],
        "prompt": metadata.get("prompt", ""),
        "correct": bool(verdict.correct),
        "reason": verdict.reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps(
            details if details is not None else {k: list(map(list, v)) for k, v in verdict.detected.items()}
        ),
        "strict_correct": bool(verdict.strict_correct),
        "partial": float(verdict.partial),
    }


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results JSONL (ours or the official one); a ``metadata`` given as an object is
    re-encoded with ``json.dumps``, the string the official script writes."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if not isinstance(row["metadata"], str):
                row["metadata"] = json.dumps(row["metadata"])
            rows.append(row)
    return rows


def write_results(rows: Sequence[dict], path: str | Path) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def summary(rows: Sequence[dict]) -> tuple[dict, str]:
    """``(numbers, text)``: the text is byte-for-byte what ``summary_scores.py`` prints for these rows;
    ``numbers`` adds each task's ``correct`` and ``images`` counts to :func:`summarize`'s dict."""
    if not rows:
        raise ValueError("no GenEval results to summarise")
    numbers, text = summarize(rows)
    counts: dict[str, list[int]] = {}
    for row in rows:
        counts.setdefault(row["tag"], [0, 0])
        counts[row["tag"]][0] += bool(row["correct"])
        counts[row["tag"]][1] += 1
    numbers["per_task_counts"] = {tag: {"correct": c, "images": n} for tag, (c, n) in counts.items()}
    return numbers, text


def write_summary(rows: Sequence[dict], folder: str | Path) -> tuple[Path, Path]:
    """``summary.txt`` (the official text) and ``summary.json`` (the same numbers) in ``folder``."""
    folder = Path(folder)
    numbers, text = summary(rows)
    write_text_atomic(folder / "summary.txt", text)
    write_text_atomic(folder / "summary.json", json.dumps(numbers, indent=1) + "\n")
    return folder / "summary.txt", folder / "summary.json"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtdmd.geneval.summary results.jsonl [--json out.json]``: print the official summary."""
    parser = argparse.ArgumentParser(description="GenEval summary (the text of the official summary_scores.py)")
    parser.add_argument("results", help="per-image results JSONL")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    numbers, text = summary(read_results(args.results))
    sys.stdout.write(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(numbers, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
