"""Harness stage ``generate``: (method, suite) -> ``images/`` + ``manifest.jsonl``.

One manifest row per image with every input that determines it and a content key (sha256 of those
inputs). Image ``k`` of prompt ``prompt_id`` under run seed ``seed`` draws its noise from
``seed_for(seed, "<suite>/<prompt_id>", k, step)``, so it is the same image whichever process,
batch or order produced it; a run directory holds the images of every seed it was asked for. A
rerun regenerates only images whose row is missing, whose file is missing or corrupt (sha256), or
whose inputs changed; a kill loses at most the chunk in flight.
Under ``torchrun`` the missing images are dealt round-robin to the ranks; each rank appends to its
own manifest part, and rank 0 merges the parts into the canonical manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bench.methods import MethodCard, build_method
from bench.runfiles import MANIFEST, MANIFEST_PARTS, prompt_columns, read_cache, row_key
from rtdmd import distributed, run_dir
from rtdmd.errors import kill_point
from rtdmd.files import JsonLinesAppender, write_text_atomic
from rtdmd.images import save_png
from rtdmd.sampling import ForwardCounter, generate
from rtdmd.seeding import INIT_STEP, seed_for
from rtdmd.suites import Suite


@dataclass(frozen=True)
class GenerateSpec:
    """The run directory's ``config.yaml``. A rerun must match its method and suite (or use another
    directory); its extent (:data:`EXTENT`) grows to the union of every request (:func:`grown`)."""

    method: MethodCard
    suite: str
    suite_version: str
    suite_sha256: str
    seeds: tuple[int, ...] = (0,)
    limit: int = 0  # the first N prompts (0 = all)
    images_per_prompt: int = 1
    prompts: int = 0  # how many prompts that makes: the manifest must hold prompts x seeds x images_per_prompt rows


ANOTHER_OUT = (
    "A run folder holds one method card on one suite version; it grows with more prompts, seeds or images per "
    "prompt, but anything else needs another --out."
)
# what a later request may change: a run folder grows, and an image's content key depends on none of these
EXTENT = ("seeds", "limit", "images_per_prompt", "prompts")


def grown(root: Path, spec: GenerateSpec, suite: Suite) -> tuple[GenerateSpec, list[str]]:
    """``spec`` widened to hold everything the run folder already holds: the union of the run seeds, the
    larger prompt limit (0 = all) and the larger number of images per prompt, so a smoke run grows into the
    full run in place and a smaller request reuses the folder whole. Returns the spec and notes for the user."""
    config = root / "config.yaml"
    old = yaml.safe_load(config.read_text()) if config.exists() else None
    if not isinstance(old, dict) or not all(key in old for key in EXTENT):
        return spec, []  # a new folder (or one prepare() will refuse as a different config)
    limit = 0 if 0 in (old["limit"], spec.limit) else max(old["limit"], spec.limit)
    wider = dataclasses.replace(
        spec,
        seeds=tuple(sorted(set(old["seeds"]) | set(spec.seeds))),
        limit=limit,
        images_per_prompt=max(old["images_per_prompt"], spec.images_per_prompt),
        prompts=len(suite.rows[:limit] if limit else suite.rows),
    )
    extent = lambda d: f"{d['prompts']} prompts x seeds {','.join(map(str, d['seeds']))} x {d['images_per_prompt']}"  # noqa: E731
    notes = []
    if extent(old) != extent(dataclasses.asdict(wider)):
        notes.append(f"{root} grows from {extent(old)} to {extent(dataclasses.asdict(wider))}: what it held is reused")
    if wider != spec:
        notes.append(
            f"{root} holds {extent(dataclasses.asdict(wider))}, more than asked ({extent(dataclasses.asdict(spec))}): "
            "its manifest, scores and summary cover all of it (use another --out for a smaller run)"
        )
    return wider, notes


@dataclass(frozen=True)
class Item:
    row: dict
    seed: int
    sample_index: int

    @property
    def key(self) -> tuple[str, int, int]:
        return self.row["prompt_id"], self.seed, self.sample_index


def run_path(out: Path, method: str, suite: str) -> Path:
    return Path(out) / method / suite


def file_name(prompt_id: str, seed: int, k: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id)
    if safe != prompt_id:  # keep names unique after sanitising
        safe += "-" + hashlib.sha256(prompt_id.encode()).hexdigest()[:8]
    return f"images/seed{seed}/{safe}_{k}.png"


def items_of(suite: Suite, limit: int, images_per_prompt: int, seeds: tuple[int, ...] = (0,)) -> list[Item]:
    rows = suite.rows[:limit] if limit else suite.rows
    return [Item(row, seed, k) for row in rows for seed in seeds for k in range(images_per_prompt)]


def content_key(spec: GenerateSpec, item: Item) -> str:
    inputs = [
        spec.method.fingerprint(),
        spec.suite,
        item.row["prompt_id"],
        item.row["prompt"],
        item.sample_index,
        item.seed,
    ]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def manifest_parts(root: Path) -> list[Path]:
    return sorted(root.glob(MANIFEST_PARTS))


def valid_rows(
    root: Path, spec: GenerateSpec, items: list[Item], paths: list[Path] | None = None
) -> dict[tuple[str, int, int], dict]:
    """Rows of the manifest files ``paths`` (default: the canonical manifest and leftover rank parts)
    whose image is intact and current."""
    wanted = {item.key: content_key(spec, item) for item in items}
    found: dict[tuple[str, int, int], dict] = {}
    for path in paths if paths is not None else [root / MANIFEST, *manifest_parts(root)]:
        for row in read_cache(path):
            key = row_key(row)
            image = root / row["file"]
            if (
                wanted.get(key) == row["content_key"]
                and image.is_file()
                and hashlib.sha256(image.read_bytes()).hexdigest() == row["sha256"]
            ):
                found[key] = row
    return found


def generate_stage(
    method: MethodCard,
    suite: Suite,
    out: Path,
    *,
    seeds: tuple[int, ...] = (0,),
    limit: int = 0,
    images_per_prompt: int = 0,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate what is missing for (method, suite) under ``out``; returns counts and the measured NFE."""
    world = distributed.init(device)
    spec = GenerateSpec(
        method,
        suite.card.name,
        suite.card.version,
        suite.sha256,
        tuple(seeds),
        limit,
        images_per_prompt or suite.card.images_per_prompt,
        len(suite.rows[:limit] if limit else suite.rows),
    )
    root = run_path(out, method.name, suite.card.name)
    with run_dir.exclusive(root, world.is_main):  # one writer per run folder
        spec, notes = grown(root, spec, suite)  # every rank reads the config before rank 0 rewrites it
        notes = notes if world.is_main else []
        distributed.barrier()
        if world.is_main:
            run_dir.prepare(root, spec, mutable=EXTENT, device=world.device, elsewhere=ANOTHER_OUT)
            for seed in spec.seeds:
                (root / "images" / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        items = items_of(suite, spec.limit, spec.images_per_prompt, spec.seeds)
        done = valid_rows(root, spec, items)
        missing = [item for item in items if item.key not in done]
        distributed.barrier()  # every rank has read the manifests before any rank appends (as in score)
        mine = missing[world.rank :: world.size]
        rows_forwarded, sampling_seconds = 0, 0.0
        if mine:
            backbone, net = build_method(method, world.device)
            start = time.perf_counter()  # sampling and PNG writing; the model's loading is not in it
            if world.is_main:  # prompts a text encoder cuts, said once for the run (every rank would say the same)
                notes += backbone.truncation_notes(list(dict.fromkeys(it.row["prompt"] for it in missing)))
            counter = ForwardCounter(net)
            part = JsonLinesAppender(root / f"manifest.part{world.rank}.jsonl")
            done_count = 0
            with PngWriter(png_workers(world.device)) as writer:
                for chunk in chunks_by_seed(mine, method.compute_batch):
                    if progress:
                        progress(done_count, len(mine))
                    done_count += len(chunk)
                    calls_before = counter.rows
                    pixels = generate(
                        backbone,
                        net,
                        [it.row["prompt"] for it in chunk],
                        [(f"{spec.suite}/{it.row['prompt_id']}", it.sample_index) for it in chunk],
                        method.sampler,
                        run_seed=chunk[0].seed,
                        height=method.height,
                        width=method.width,
                        compute_batch=method.compute_batch,
                        as_uint8=True,
                    )
                    nfe = (
                        counter.rows - calls_before
                    ) / method.compute_batch  # rows per sampled chain (CFG counts twice)
                    files = [file_name(it.row["prompt_id"], it.seed, it.sample_index) for it in chunk]
                    writer.submit(
                        [(image, root / file) for image, file in zip(pixels, files, strict=True)],
                        lambda shas, chunk=chunk, files=files, nfe=nfe: [
                            manifest_row(spec, item, file, sha, nfe)
                            for item, file, sha in zip(chunk, files, shas, strict=True)
                        ],
                    )
                    for rows in writer.finished():
                        part.append(rows)
                        kill_point("generate-chunk")
                for rows in writer.finished(wait_all=True):
                    part.append(rows)
                    kill_point("generate-chunk")
            part.close()
            counter.close()
            rows_forwarded = counter.rows
            sampling_seconds = time.perf_counter() - start
            if progress:
                progress(len(mine), len(mine))
        # the slowest rank's time (a multi-GPU run's images are all there only then); a collective, so
        # also the barrier before rank 0 merges the manifests
        sampling_seconds = float(distributed.max_across(torch.tensor(sampling_seconds)))
        if world.is_main:
            merged = done | valid_rows(root, spec, items, manifest_parts(root))  # `done` was verified above
            if len(merged) != len(items):
                raise RuntimeError(f"{len(items) - len(merged)} images are still missing after generation")
            text = "".join(json.dumps(merged[item.key]) + "\n" for item in items)
            write_text_atomic(root / MANIFEST, text)
            for part_file in manifest_parts(root):
                part_file.unlink()
        distributed.barrier()
        return {
            "run_dir": str(root),
            "images": len(items),
            "generated": len(missing),
            "skipped": len(items) - len(missing),
            "rows_forwarded": rows_forwarded,
            "sampling_seconds": sampling_seconds,
            "notes": notes,
        }


def chunks_by_seed(items: list[Item], size: int) -> list[list[Item]]:
    """Consecutive chunks of at most ``size`` items sharing one run seed (a sampler call takes one)."""
    chunks: list[list[Item]] = []
    for seed in dict.fromkeys(item.seed for item in items):
        same = [item for item in items if item.seed == seed]
        chunks += [same[i : i + size] for i in range(0, len(same), size)]
    return chunks


def manifest_row(spec: GenerateSpec, item: Item, file: str, sha256: str, nfe: float) -> dict:
    """The manifest row of an image written to ``file`` (relative to the run folder) with bytes ``sha256``."""
    row = item.row
    coord = f"{spec.suite}/{row['prompt_id']}"
    return {
        **prompt_columns(spec, row),
        "sample_index": item.sample_index,
        "seed": item.seed,
        "init_seed": seed_for(item.seed, coord, item.sample_index, INIT_STEP),
        "method": spec.method.name,
        "method_fingerprint": spec.method.fingerprint(),
        "height": spec.method.height,
        "width": spec.method.width,
        "nfe": nfe,
        "file": file,
        "sha256": sha256,
        "content_key": content_key(spec, item),
    }


def png_workers(device) -> int:
    """Threads that write PNGs while the next chunk samples: on a GPU the CPU cores are otherwise idle (PNG
    encoding of a 1024 px image takes ~0.15 s, as long as sampling it); on a CPU the sampler already uses
    every core, and writing in the sampling thread keeps the order of writes fixed."""
    return 0 if torch.device(device).type == "cpu" else min(8, os.cpu_count() or 1)


class PngWriter:
    """PNG files of a chunk written by a thread pool (Pillow's encoder and hashlib release the GIL) while
    the next chunk samples; its manifest rows are released once every file of the chunk is on disk, in
    chunk order, so a row never names a file that is not there. At most one chunk is in flight; with
    ``workers`` 0 each chunk is written before the next starts."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="png") if workers else None
        self.pending: deque = deque()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, jobs: list[tuple[torch.Tensor, Path]], rows_of: Callable[[list[str]], list[dict]]) -> None:
        if self.pool is None:
            self.pending.append((rows_of, [save_png(pixels, path) for pixels, path in jobs]))
        else:
            self.pending.append((rows_of, [self.pool.submit(save_png, pixels, path) for pixels, path in jobs]))

    def finished(self, wait_all: bool = False) -> Iterator[list[dict]]:
        """Rows of the chunks whose files are written: all but the newest chunk (``wait_all``: every chunk)."""
        keep = 0 if wait_all or self.pool is None else 1
        while len(self.pending) > keep:
            rows_of, shas = self.pending.popleft()
            yield rows_of([sha if isinstance(sha, str) else sha.result() for sha in shas])
