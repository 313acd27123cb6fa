"""The toy prompt suites as package data: ``rtdmd/toyworld/suites/{toy_geneval,toy_train}.jsonl``.

Both files use GenEval's ``evaluation_metadata.jsonl`` format: one JSON object per line, keys in
GenEval's order (tag, include, [exclude], prompt), ``json.dumps`` default separators.

* ``toy_geneval.jsonl``: the evaluation prompts, :func:`rtdmd.toyworld.data.eval_metadata`;
* ``toy_train.jsonl``: the first :data:`TRAIN_PROMPTS` distinct prompts of the training stream
  ``train_metadata(0, i)``, i = 0, 1, 2, ... (disjoint from the evaluation prompts by construction).

The files are generated, committed, and pinned by sha256 in ``rtdmd/cards/suites/toy-*.yaml``;
regenerate them with ``python -m rtdmd.toyworld.suites``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import resources
from pathlib import Path

from rtdmd.files import write_bytes_atomic
from rtdmd.toyworld.data import eval_metadata, train_metadata

SUITES_DIR = Path(str(resources.files("rtdmd.toyworld") / "suites"))
TRAIN_SEED = 0
TRAIN_PROMPTS = 2000
# every draw repeats an earlier prompt at most this often on average before we call the stream exhausted
MAX_DRAWS_PER_PROMPT = 50


def jsonl_bytes(rows: list[dict] | tuple[dict, ...]) -> bytes:
    """GenEval's metadata file layout: ``json.dumps`` per row (key order kept), newline-terminated."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def train_rows(count: int = TRAIN_PROMPTS, seed: int = TRAIN_SEED) -> list[dict]:
    """The first ``count`` distinct prompts of the training stream, in stream order (first occurrence)."""
    rows: dict[str, dict] = {}
    for index in range(count * MAX_DRAWS_PER_PROMPT):
        metadata = train_metadata(seed, index)
        rows.setdefault(metadata["prompt"], metadata)
        if len(rows) == count:
            return list(rows.values())
    raise ValueError(f"the training stream gave only {len(rows)} distinct prompts in {index + 1} draws")


def build() -> dict[str, bytes]:
    """File name -> bytes of both suite files."""
    return {"toy_geneval.jsonl": jsonl_bytes(eval_metadata()), "toy_train.jsonl": jsonl_bytes(train_rows())}


def write(directory: Path = SUITES_DIR) -> dict[str, str]:
    """Write the suite files into ``directory``; returns file name -> sha256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, data in build().items():
        write_bytes_atomic(directory / name, data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else SUITES_DIR
    for name, digest in write(target).items():
        print(f"{digest}  {target / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
