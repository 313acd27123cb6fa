"""``rtdmd-bench import FOLDER --suite NAME``: images made by other code become a run folder.

Two layouts are read:

* GenEval's ``<index>/samples/<k>.png`` (``index`` the prompt's position in the suite, as GenEval's
  ``generation`` scripts write it, with an optional ``<index>/metadata.jsonl`` whose prompt is checked);
* flat ``<prompt_id>_<k>.png`` (the prompt id as this harness names image files: characters other than
  ``A-Za-z0-9._-`` replaced, e.g. ``color_00012_3.png`` for T2I-CompBench's ``color/00012``).

The folder must hold the same number of images for every prompt of the suite (or of its first
``--limit`` prompts) and nothing else; then the images are linked (or copied) into
``<out>/<method>/<suite>/images/seed<s>/`` with a manifest, and ``score``/``aggregate``/``report``/
``compare`` work as for generated runs. Their noise is unknown (``init_seed`` null) and their NFE
unmeasured (null).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from bench.generate import file_name, run_path
from bench.methods import MethodCard, load_method
from bench.runfiles import MANIFEST, prompt_columns
from rtdmd import run_dir
from rtdmd.errors import RtdmdError
from rtdmd.files import write_text_atomic
from rtdmd.suites import Suite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
FLAT_NAME = re.compile(r"^(?P<stem>.+)_(?P<k>\d+)$")


class FolderImportError(RtdmdError, ValueError):
    """A folder that does not match the suite: the message says what is missing or extra."""


@dataclass(frozen=True)
class ImportSpec:
    """``config.yaml`` of an imported run: the extent ``aggregate`` checks, and where the images came from."""

    method: MethodCard
    suite: str
    suite_version: str
    suite_sha256: str
    seeds: tuple[int, ...]
    limit: int
    images_per_prompt: int
    prompts: int
    imported_from: str
    layout: str


def safe_id(prompt_id: str) -> str:
    """The file-name stem of a prompt id (:func:`bench.generate.file_name` without its folder and index)."""
    return Path(file_name(prompt_id, 0, 0)).name[: -len("_0.png")]


def layout_of(folder: Path) -> str:
    """``geneval`` if the folder has ``<digits>/samples/`` subfolders, else ``flat``."""
    if any(p.is_dir() and p.name.isdigit() and (p / "samples").is_dir() for p in folder.iterdir()):
        return "geneval"
    return "flat"


def found_images(folder: Path, rows: list[dict], layout: str) -> dict[tuple[int, int], Path]:
    """``{(row index, sample index): path}`` of every image in ``folder``; a file that names no prompt stops."""
    images: dict[tuple[int, int], Path] = {}
    if layout == "geneval":
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not sub.name.isdigit() or int(sub.name) >= len(rows):
                raise FolderImportError(
                    f"{sub} names no prompt of the suite (it has {len(rows)} prompts, indices 0-{len(rows) - 1})"
                )
            index = int(sub.name)
            check_geneval_metadata(sub, rows[index])
            for path in sorted((sub / "samples").iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.stem.isdigit():
                    images[(index, int(path.stem))] = path
        return images
    by_stem = {safe_id(row["prompt_id"]): i for i, row in enumerate(rows)}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        match = FLAT_NAME.match(path.stem)
        if not match or match["stem"] not in by_stem:
            raise FolderImportError(
                f"{path.name} names no prompt of the suite: flat files are <prompt_id>_<k>{path.suffix} "
                f"(e.g. {safe_id(rows[0]['prompt_id'])}_0.png)"
            )
        images[(by_stem[match["stem"]], int(match["k"]))] = path
    return images


def check_geneval_metadata(sub: Path, row: dict) -> None:
    """GenEval writes each prompt's metadata beside its samples: it must be the suite's prompt at that index."""
    meta = sub / "metadata.jsonl"
    if meta.is_file():
        prompt = json.loads(meta.read_text().splitlines()[0]).get("prompt")
        if prompt is not None and prompt != row["prompt"]:
            raise FolderImportError(
                f"{meta} holds prompt {prompt!r}, but prompt {int(sub.name)} of the suite is {row['prompt']!r}: "
                "was the folder made from this suite, in its order?"
            )


def images_per_prompt_of(images: dict[tuple[int, int], Path], n_rows: int, rows: list[dict]) -> int:
    """The common number of images per prompt; a prompt with fewer, more or gapped images stops."""
    per_prompt: dict[int, set[int]] = defaultdict(set)
    for index, k in images:
        per_prompt[index].add(k)
    if missing := [i for i in range(n_rows) if i not in per_prompt]:
        raise FolderImportError(
            f"{len(missing)} prompt(s) of the suite have no image (first: {missing[0]}, {rows[missing[0]]['prompt']!r})"
        )
    if extra := sorted(i for i in per_prompt if i >= n_rows):
        raise FolderImportError(
            f"the folder holds images of {len(extra)} prompt(s) beyond the first {n_rows} (--limit)"
        )
    counts = {i: len(ks) for i, ks in per_prompt.items()}
    count = max(counts.values())
    if bad := [i for i, ks in per_prompt.items() if ks != set(range(count))]:
        raise FolderImportError(
            f"prompt {bad[0]} ({rows[bad[0]]['prompt']!r}) has images {sorted(per_prompt[bad[0]])}, not 0-{count - 1}: "
            "every prompt needs the same number of images, numbered from 0"
        )
    return count


def place(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` (no copy of a large folder), else copy it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def method_card(name: str) -> MethodCard:
    """The method card named (a packaged name or a YAML path), else a bare card that only labels the images."""
    try:
        return load_method(name)
    except RtdmdError:
        return MethodCard(name=name, display=name, description="imported images", licence="unknown")


def import_stage(folder: Path, suite: Suite, out: Path, method: str, seed: int = 0, limit: int = 0) -> dict:
    """Build ``<out>/<method>/<suite>/`` from ``folder``; returns counts and the run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderImportError(f"{folder} is not a folder")
    rows = suite.rows[:limit] if limit else suite.rows
    layout = layout_of(folder)
    images = found_images(folder, suite.rows, layout)
    ipp = images_per_prompt_of(images, len(rows), rows)
    card = method_card(method)
    spec = ImportSpec(
        card,
        suite.card.name,
        suite.card.version,
        suite.sha256,
        (seed,),
        limit,
        ipp,
        len(rows),
        str(folder.resolve()),
        layout,
    )
    root = run_path(out, card.name, suite.card.name)
    with run_dir.exclusive(root):
        run_dir.prepare(root, spec, elsewhere="An imported run folder holds one import: use another --out.")
        manifest = [
            manifest_row(spec, root, rows[index], k, images[(index, k)])
            for index in range(len(rows))
            for k in range(ipp)
        ]
        write_text_atomic(root / MANIFEST, "".join(json.dumps(row) + "\n" for row in manifest))
    return {
        "run_dir": str(root),
        "images": len(manifest),
        "prompts": len(rows),
        "images_per_prompt": ipp,
        "layout": layout,
    }


def manifest_row(spec: ImportSpec, root: Path, row: dict, k: int, source: Path) -> dict:
    seed = spec.seeds[0]
    file = str(Path(file_name(row["prompt_id"], seed, k)).with_suffix(source.suffix.lower()))
    place(source, root / file)
    data = (root / file).read_bytes()
    with Image.open(root / file) as image:
        width, height = image.size
    fingerprint = spec.method.fingerprint()
    key = [f"import:{fingerprint}", spec.suite, row["prompt_id"], row["prompt"], k, seed]
    return {
        **prompt_columns(spec, row),
        "sample_index": k,
        "seed": seed,
        "init_seed": None,  # made by other code: its noise is unknown
        "method": spec.method.name,
        "method_fingerprint": fingerprint,
        "height": height,
        "width": width,
        "nfe": None,  # not measured
        "file": file,
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_key": hashlib.sha256(json.dumps(key).encode()).hexdigest(),
    }
