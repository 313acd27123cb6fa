"""``rtdmd-train sample``: images from a backbone with a sampler spec, into a resumable run directory.

Each image is addressed by ``(prompt_id, sample_index)`` with ``prompt_id = sha256(prompt)[:16]``,
so an image depends on its prompt text, index, seed and spec, not on its position in the list. The
run directory gets ``config.yaml``, ``env.json``, ``images/<prompt_id>_<k>.png``, ``samples.jsonl``
(one row per image, with the PNG's sha256) and ``grid.png``. A rerun skips images whose file is
present and intact.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rtdmd import distributed, run_dir
from rtdmd.backbones import BACKBONES
from rtdmd.backbones.base import BackboneConfig, build_backbone, check_resolution
from rtdmd.data import read_prompt_file
from rtdmd.files import JsonLinesAppender, read_jsonl, save_image_atomic, write_text_atomic
from rtdmd.images import grid, save_png, to_uint8
from rtdmd.sampling import ForwardCounter, SamplerSpec, generate
from rtdmd.seeding import INIT_STEP, seed_for


@dataclass(frozen=True)
class SampleConfig:
    """Config schema of ``rtdmd-train sample`` (packaged YAMLs: ``rtdmd/configs/sample/*.yaml``)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    prompts: tuple[str, ...] = ()
    prompt_file: str = ""  # a text file with one prompt per line, used after `prompts`
    images_per_prompt: int = 1
    height: int = 64
    width: int = 64
    seed: int = 0
    compute_batch: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_dir: str = "runs/sample"

    def validate(self) -> None:
        if not self.prompts and not self.prompt_file:
            raise ValueError("give prompts or a prompt_file")
        if self.images_per_prompt < 1 or self.compute_batch < 1:
            raise ValueError("images_per_prompt and compute_batch must be >= 1")
        # fail before loading weights: each family needs whole tokens (16 px for the real ones)
        check_resolution(
            self.height,
            self.width,
            BACKBONES.get(self.backbone.family).REFERENCE_PIXELS_PER_TOKEN,
            self.backbone.family,
        )


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompts(cfg: SampleConfig) -> list[str]:
    """The config's prompts, then its prompt file's (:func:`rtdmd.data.read_prompt_file`), each once."""
    prompts = list(cfg.prompts) + (read_prompt_file(cfg.prompt_file) if cfg.prompt_file else [])
    return list(dict.fromkeys(prompts))  # a repeated prompt would address the same images


def done_rows(root: Path) -> dict[str, dict]:
    """Rows of ``samples.jsonl`` whose image file exists with the recorded sha256."""
    rows = {}
    for row in read_jsonl(root / "samples.jsonl", bad="skip"):  # a torn row's image is made again
        path = root / row["file"]
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]:
            rows[row["file"]] = row
    return rows


def image_row(cfg: SampleConfig, root: Path, prompt: str, pid: str, k: int, pixels: torch.Tensor) -> dict:
    """Save one image and describe it (one ``samples.jsonl`` row)."""
    file = f"images/{pid}_{k}.png"
    return {
        "prompt_id": pid,
        "prompt": prompt,
        "sample_index": k,
        "init_seed": seed_for(cfg.seed, pid, k, INIT_STEP),
        "file": file,
        "sha256": save_png(pixels, root / file),
        "mean_pixel": round(float(pixels.float().mean()) / 255, 6),
    }


def run(cfg: SampleConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate what is missing; return a summary (rows, timings, measured NFE).

    ``progress(done, total)`` is called before the first chunk and after each one."""
    device = distributed.resolve_device(cfg.device)  # a bad device must not leave a run directory behind
    root = run_dir.prepare(cfg.run_dir, cfg)
    (root / "images").mkdir(exist_ok=True)
    prompts = read_prompts(cfg)
    todo = [(p, prompt_id(p), k) for p in prompts for k in range(cfg.images_per_prompt)]
    done = done_rows(root)
    missing = [t for t in todo if f"images/{t[1]}_{t[2]}.png" not in done]
    load_s = gen_s = 0.0
    nfe = None
    new_rows: dict[str, dict] = {}
    if missing:  # a finished run loads no weights
        t0 = time.perf_counter()
        backbone = build_backbone(cfg.backbone, device)
        load_s = time.perf_counter() - t0
        counter = ForwardCounter(backbone.transformer)
        t1 = time.perf_counter()
        index = JsonLinesAppender(root / "samples.jsonl")
        # one compute chunk at a time, each saved at once: a kill loses at most one chunk
        for start in range(0, len(missing), cfg.compute_batch):
            if progress:
                progress(start, len(missing))
            part = missing[start : start + cfg.compute_batch]
            images = generate(
                backbone,
                backbone.transformer,
                [p for p, _, _ in part],
                [(pid, k) for _, pid, k in part],
                cfg.sampler,
                run_seed=cfg.seed,
                height=cfg.height,
                width=cfg.width,
                compute_batch=cfg.compute_batch,
            )
            rows = [
                image_row(cfg, root, prompt, pid, k, pixels)
                for (prompt, pid, k), pixels in zip(part, to_uint8(images), strict=True)
            ]
            index.append(rows)
            new_rows |= {row["file"]: row for row in rows}
        index.close()
        if progress:
            progress(len(missing), len(missing))
        gen_s = time.perf_counter() - t1
        counter.close()
        # rows through the transformer per sampled chain (padding rows count on both sides)
        nfe = counter.rows / (-(-len(missing) // cfg.compute_batch) * cfg.compute_batch)
    rows = [(done | new_rows)[f"images/{pid}_{k}.png"] for _, pid, k in todo]
    write_text_atomic(root / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pixels = [torch.from_numpy(np.array(Image.open(root / r["file"]).convert("RGB"))) for r in rows]
    columns = cfg.images_per_prompt if cfg.images_per_prompt > 1 else min(8, len(pixels))
    save_image_atomic(grid(pixels, columns), root / "grid.png")
    return {
        "run_dir": str(root),
        "rows": rows,
        "generated": len(missing),
        "skipped": len(todo) - len(missing),
        "device": str(device),
        "load_seconds": load_s,
        "generate_seconds": gen_s,
        "nfe_per_image": nfe,
    }
