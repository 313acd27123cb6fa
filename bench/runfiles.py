"""The files of a harness run folder ``<out>/<method>/<suite>/``, named and read in one place.

Every stage reads and writes through here, so no stage imports another for a file name:

* ``manifest.jsonl`` (:class:`ManifestRow` per image; rank parts ``manifest.part<r>.jsonl`` while
  generating) — written by ``generate``;
* ``scores.jsonl`` (:class:`ScoreRow` per image and metric; rank parts ``scores.part<r>.jsonl``) and
  ``set_scores.json`` (set metrics, one value per run seed) — written by ``score``;
* ``summary.json`` — written by ``aggregate``, read by ``report``.

A score is cached under :func:`cache_key`: the image's bytes (sha256), its prompt, the metric and the
metric's version, so a changed image, prompt or metric is scored again and nothing else is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict

from rtdmd.errors import RtdmdError
from rtdmd.files import read_jsonl
from rtdmd.suites import ROW_KEYS

MANIFEST = "manifest.jsonl"
SCORES = "scores.jsonl"
SET_SCORES = "set_scores.json"
SUMMARY = "summary.json"
MANIFEST_PARTS = "manifest.part*.jsonl"
SCORE_PARTS = "scores.part*.jsonl"

REPAIR_MANIFEST = (
    "run `rtdmd-bench generate` (or `run`) again with the same arguments: it regenerates the images "
    "whose rows were lost and rewrites the manifest"
)
REPAIR_SCORES = "run `rtdmd-bench score` on this run again: it rewrites scores.jsonl from its cache"
REPAIR_SUMMARY = "run `rtdmd-bench aggregate` on its run again, which rewrites it"


class RunFileError(RtdmdError, ValueError):
    """A run folder's file is torn or inconsistent: the message names it and says what to do."""


class ManifestRow(TypedDict):
    """One generated image (``manifest.jsonl``)."""

    suite: str
    suite_version: str
    suite_sha256: str
    prompt_id: str
    prompt: str
    category: str
    metadata: str  # the prompt's metadata as a JSON text (decode with :func:`metadata_of`)
    sample_index: int
    seed: int  # the run seed
    init_seed: int | None  # None: imported images, made with noise this harness did not draw
    method: str
    method_fingerprint: str
    height: int
    width: int
    nfe: float | None  # None: imported images (not measured)
    file: str  # relative to the run folder
    sha256: str  # of the PNG's bytes
    content_key: str


class ScoreRow(TypedDict):
    """One image's score under one metric (``scores.jsonl``)."""

    prompt_id: str
    seed: int
    sample_index: int
    prompt: str
    sha256: str
    metric: str
    version: str
    score: float


def prompt_columns(spec: Any, row: dict) -> dict:
    """The manifest columns a suite determines: its name, version and fingerprint (``spec.suite``,
    ``spec.suite_version``, ``spec.suite_sha256``) and the prompt's row (id, text, category, metadata)."""
    return {
        "suite": spec.suite,
        "suite_version": spec.suite_version,
        "suite_sha256": spec.suite_sha256,
        **{key: row[key] for key in ROW_KEYS},
    }


def row_key(row: ManifestRow | ScoreRow) -> tuple[str, int, int]:
    """A manifest or score row's image: (prompt id, run seed, sample index)."""
    return row["prompt_id"], row["seed"], row["sample_index"]


def init_seeds(manifest: list[ManifestRow]) -> dict[tuple[str, int, int], int | None]:
    """Each image's initial-noise seed by :func:`row_key` (None where the images were imported)."""
    return {row_key(r): r["init_seed"] for r in manifest}


def same_noise(a: list[ManifestRow], b: list[ManifestRow]) -> bool:
    """The two manifests hold the same images by coordinate, with the same noise wherever both know it."""
    noise_a, noise_b = init_seeds(a), init_seeds(b)
    return noise_a.keys() == noise_b.keys() and all(
        None in (seed, noise_b[key]) or seed == noise_b[key] for key, seed in noise_a.items()
    )


def image_key(row: ManifestRow | ScoreRow) -> tuple[str, str]:
    """What a score depends on besides the metric: the image's bytes and its prompt."""
    return row["sha256"], row["prompt"]


def cache_key(row: ManifestRow | ScoreRow, metric: str, version: str) -> tuple[str, str, str, str]:
    return (*image_key(row), metric, str(version))


def metadata_of(row: ManifestRow) -> dict[str, Any]:
    """A row's prompt metadata (GenEval's ``tag``/``include``, ...), decoded."""
    return json.loads(row["metadata"])


def read_manifest(root: Path) -> list[ManifestRow]:
    """The canonical manifest ([] if absent); a torn line stops with what to do."""
    return read_jsonl(root / MANIFEST, repair=REPAIR_MANIFEST, error=RunFileError)


def read_scores(root: Path) -> list[ScoreRow]:
    return read_jsonl(root / SCORES, repair=REPAIR_SCORES, error=RunFileError)


def read_cache(path: Path) -> list[dict]:
    """Rows of a rank part or a cache: a torn line is skipped (what it held is computed again)."""
    return read_jsonl(path, bad="skip")


def read_set_scores(root: Path) -> list[dict]:
    path = Path(root) / SET_SCORES
    return json.loads(path.read_text()) if path.exists() else []


def read_summary(path: Path) -> dict:
    """A ``summary.json``; one that is not JSON (copied half, edited) is a :class:`RunFileError`."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunFileError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}): {REPAIR_SUMMARY}"
        ) from None
