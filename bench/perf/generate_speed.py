"""Images per second: ``rtdmd-bench generate`` end to end against the diffusers pipeline, same card, same run.

Random weights at the released sizes (``bench/perf/real_sizes.py``), bf16. For each mode and batch size:

* ``diffusers``: the family's diffusers pipeline called on ``batch`` prompts at a time (``output_type="pil"``,
  no PNG written: a baseline that favours diffusers), optionally with its transformer compiled
  (``torch.compile`` default mode, as users do);
* ``rtdmd``: :func:`bench.generate.generate_stage` (what ``rtdmd-bench generate`` runs after loading the
  model): sampling with per-coordinate seeds, VAE decode, PNG files, sha256 and the manifest, with the
  method card's ``compute_batch`` = ``batch``. Its stage times (encode, sample, decode, write) are
  reported beside it.

Modes: ``student`` (4 steps, no CFG: the RTDMD sampler, CPS eta 0.9; diffusers: its Euler scheduler, 4
steps) and ``teacher`` (10 steps, CFG 4.5; both Euler). Each timing follows a warm-up call of the same
shape (compile happens there and is reported as ``first_call_s``).

    python bench/perf/generate_speed.py --family sd35m --resolution 1024 --images 16 --out gen.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench.generate as bench_generate  # noqa: E402
from bench.methods import MethodCard  # noqa: E402
from bench.perf.distill_step import build_backbone  # noqa: E402
from rtdmd.backbones.base import BackboneConfig  # noqa: E402
from rtdmd.sampling import SamplerSpec  # noqa: E402
from rtdmd.suites import load_suite  # noqa: E402

FAMILY_OF = {"sd3m": "sd3", "sd35m": "sd3", "flux2_4b": "flux2", "flux2_9b": "flux2", "flux1_dev": "flux1"}
MODES = {
    "student": dict(num_steps=4, eta=0.9, guidance=1.0, timesteps=(1.0, 0.75, 0.5, 0.25)),
    "teacher": dict(num_steps=10, eta=0.0, guidance=4.5),
}
PROMPT = "a photo of a {} on a wooden table, studio lighting, highly detailed, 35mm"
OBJECTS = ["cat", "teapot", "bicycle", "violin", "lamp", "apple", "clock", "shoe", "kite", "robot", "chair", "boat"]


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def prompts(n: int) -> list[str]:
    return [PROMPT.format(f"{OBJECTS[i % len(OBJECTS)]} number {i}") for i in range(n)]


class StageTimer:
    """Wall time of the backbone's encode and decode and of PNG writing inside ``generate_stage``."""

    def __init__(self, backbone) -> None:
        self.seconds = {"encode": 0.0, "decode": 0.0, "png": 0.0}
        self.backbone = backbone

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[name] += time.perf_counter() - start
            return out

        return timed

    @contextlib.contextmanager
    def installed(self):
        encode, decode, save_png = self.backbone.encode, self.backbone.decode, bench_generate.save_png
        self.backbone.encode = self.wrap("encode", encode)
        self.backbone.decode = self.wrap("decode", decode)
        bench_generate.save_png = self.wrap("png", save_png)
        try:
            yield self
        finally:
            self.backbone.encode, self.backbone.decode, bench_generate.save_png = encode, decode, save_png


def ours(backbone, family: str, mode: str, batch: int, images: int, resolution: int) -> dict:
    card = MethodCard(
        name=f"bench-{mode}",
        backbone=BackboneConfig(family=FAMILY_OF[family], dtype="bfloat16"),
        sampler=SamplerSpec(**MODES[mode]),
        height=resolution,
        width=resolution,
        compute_batch=batch,
    )
    bench_generate.build_method = lambda _card, _device: (backbone, backbone.transformer)  # the random model
    folder = Path(tempfile.mkdtemp())
    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("\n".join(prompts(images)) + "\n")
    suite = load_suite(str(prompt_file))
    sync()
    start = time.perf_counter()
    bench_generate.generate_stage(card, suite, folder / "warm", limit=batch, device=DEVICE.type)
    sync()
    first = time.perf_counter() - start
    with StageTimer(backbone).installed() as timer:
        start = time.perf_counter()
        result = bench_generate.generate_stage(card, suite, folder / "timed", device=DEVICE.type)
        sync()
        seconds = time.perf_counter() - start
    assert result["generated"] == images
    return {"images_per_s": images / seconds, "seconds": seconds, "first_call_s": first, "stages_s": timer.seconds}


def diffusers_pipe(backbone, mode: str, batch: int, images: int, resolution: int) -> dict:
    pipe = backbone.pipe
    pipe.set_progress_bar_config(disable=True)
    spec = MODES[mode]
    kwargs = dict(num_inference_steps=spec["num_steps"], height=resolution, width=resolution, output_type="pil")
    accepted = pipe.__call__.__code__.co_varnames
    if "guidance_scale" in accepted:
        kwargs["guidance_scale"] = spec["guidance"]
    if "max_sequence_length" in accepted:  # the same text length as ours (the cards' 128 for SD3)
        kwargs["max_sequence_length"] = backbone.max_sequence_length
    texts = prompts(images)
    generator = torch.Generator(DEVICE.type).manual_seed(0)
    sync()
    start = time.perf_counter()
    pipe(prompt=texts[:batch], generator=generator, **kwargs)
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    made = 0
    for i in range(0, images, batch):
        made += len(pipe(prompt=texts[i : i + batch], generator=generator, **kwargs).images)
    sync()
    seconds = time.perf_counter() - start
    assert made == images
    return {"images_per_s": images / seconds, "seconds": seconds, "first_call_s": first}


def versions() -> dict:
    return {
        name: metadata.version(name) for name in ("torch", "diffusers", "transformers") if metadata.distribution(name)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd35m", choices=sorted(FAMILY_OF))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, default=16, help="images per timed measurement")
    parser.add_argument("--student-batches", default="1,4,8")
    parser.add_argument("--teacher-batches", default="1,4")
    parser.add_argument("--sides", default="diffusers,rtdmd", help="which sides to time")
    parser.add_argument(
        "--compile-diffusers", action="store_true", help="also time diffusers with its transformer compiled"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test of this script")
    parser.add_argument("--out", default="generate_speed.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers users run it; both sides alike
    start = time.perf_counter()
    backbone = build_backbone(args.family, args.tiny, DEVICE)
    build_s = time.perf_counter() - start
    sides = args.sides.split(",")
    rows = []
    plan = [("student", int(b)) for b in args.student_batches.split(",") if b] + [
        ("teacher", int(b)) for b in args.teacher_batches.split(",") if b
    ]
    for mode, batch in plan:
        row = {"mode": mode, "batch": batch}
        if "diffusers" in sides:
            row["diffusers"] = diffusers_pipe(backbone, mode, batch, args.images, args.resolution)
        if "rtdmd" in sides:
            row["rtdmd"] = ours(backbone, args.family, mode, batch, args.images, args.resolution)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.compile_diffusers:  # each new shape recompiles (minutes): the student's larger batches only
        backbone.pipe.transformer.compile()
        for mode, batch in [(m, b) for m, b in plan if m == "student" and b >= 4]:
            row = {
                "mode": mode,
                "batch": batch,
                "diffusers_compiled": diffusers_pipe(backbone, mode, batch, args.images, args.resolution),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {
        "script": "bench/perf/generate_speed.py",
        "command": " ".join(sys.argv),
        "card": torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "python": platform.python_version(),
        "family": args.family,
        "resolution": args.resolution,
        "images": args.images,
        "build_s": build_s,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    table = Table(title=f"{args.family} {args.resolution}px, {args.images} images, {record['card']}")
    for col in ("mode", "batch", "diffusers img/s", "rtdmd img/s", "ratio", "rtdmd encode/decode/png s"):
        table.add_column(col)
    for r in rows:
        if "rtdmd" not in r:
            continue
        d = r.get("diffusers", {}).get("images_per_s")
        o = r["rtdmd"]["images_per_s"]
        s = r["rtdmd"]["stages_s"]
        table.add_row(
            r["mode"],
            str(r["batch"]),
            f"{d:.2f}" if d else "–",
            f"{o:.2f}",
            f"{o / d:.2f}" if d else "–",
            f"{s['encode']:.2f}/{s['decode']:.2f}/{s['png']:.2f} of {r['rtdmd']['seconds']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
