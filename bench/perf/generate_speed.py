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

``--limits`` adds a roofline estimate beside each row: the FLOP-bound ceiling (the card's dense bf16
peak over the model FLOPs of one image, transformer and VAE, counted eagerly at batch 1) and the
weight-streaming ceiling (``batch`` images per ``num_steps`` reads of the transformer's weights at the
card's memory bandwidth); the lower one is the limit a path approaches.

    python bench/perf/generate_speed.py --family sd35m --resolution 1024 --images 16 --out gen.json
    python bench/perf/generate_speed.py --sides rtdmd-compiled --resolution 512,1024 \
        --student-batches 1,2,4,8,16 --teacher-batches "" --limits --out scaling.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from bench.runfiles import read_manifest  # noqa: E402
from rtdmd.backbones.base import BackboneConfig, compile_for_sampling  # noqa: E402
from rtdmd.flops import count_flops, peak_bandwidth, peak_flops  # noqa: E402
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

    def wrap(self, name: str, fn, synced: bool = True):
        def timed(*args, **kwargs):
            if synced:
                sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if synced:
                sync()
            self.seconds[name] += time.perf_counter() - start  # PNG: thread-seconds, overlapping the GPU's work
            return out

        return timed

    @contextlib.contextmanager
    def installed(self):
        encode, decode, save_png = self.backbone.encode, self.backbone.decode, bench_generate.save_png
        self.backbone.encode = self.wrap("encode", encode)
        self.backbone.decode = self.wrap("decode", decode)
        bench_generate.save_png = self.wrap("png", save_png, synced=False)
        try:
            yield self
        finally:
            self.backbone.encode, self.backbone.decode, bench_generate.save_png = encode, decode, save_png


def bench_card(family: str, mode: str, batch: int, resolution: int, compiled: bool = False) -> MethodCard:
    return MethodCard(
        compile=compiled,
        name=f"bench-{mode}",
        backbone=BackboneConfig(family=FAMILY_OF[family], dtype="bfloat16"),
        sampler=SamplerSpec(**MODES[mode]),
        height=resolution,
        width=resolution,
        compute_batch=batch,
    )


def ours(backbone, family: str, mode: str, batch: int, images: int, resolution: int, compiled: bool = False) -> dict:
    card = bench_card(family, mode, batch, resolution, compiled)
    net, vae = compiled_parts(backbone) if compiled else (backbone.transformer, backbone.vae)
    eager_vae, backbone.vae = backbone.vae, vae
    bench_generate.build_method = lambda _card, _device: (backbone, net)  # the random model
    try:
        return timed_generation(backbone, card, images, batch)
    finally:
        backbone.vae = eager_vae


def limits(backbone, family: str, mode: str, batch: int, resolution: int, _flops: dict = {}) -> dict:  # noqa: B006
    """Roofline ceilings of images/s for ``mode`` at ``batch``: FLOP-bound (peak / model FLOPs per image,
    eager, batch 1, text encoding included) and weight-bound (``batch`` images per ``num_steps`` full
    reads of the transformer's weights)."""
    key = (mode, resolution)
    if key not in _flops:
        card = bench_card(family, mode, 1, resolution)
        folder = Path(tempfile.mkdtemp())
        (folder / "one.jsonl").write_text(json.dumps({"id": "p0", "prompt": prompts(1)[0]}) + "\n")
        suite = load_suite(str(folder / "one.jsonl"))
        bench_generate.build_method = lambda _card, _device: (backbone, backbone.transformer)
        _flops[key] = count_flops(
            lambda: bench_generate.generate_stage(card, suite, folder / "out", device=DEVICE.type)
        )
    weight_bytes = sum(p.numel() * p.element_size() for p in backbone.transformer.parameters())
    peak, bandwidth = peak_flops(DEVICE), peak_bandwidth(DEVICE)
    steps = MODES[mode]["num_steps"]
    return {
        "model_tflop_per_image": _flops[key] / 1e12,
        "transformer_weight_gb": weight_bytes / 1e9,
        "flop_bound_images_per_s": peak / _flops[key] if peak else None,
        "weight_bound_images_per_s": batch * bandwidth / (weight_bytes * steps) if bandwidth else None,
    }


def timed_generation(backbone, card: MethodCard, images: int, batch: int) -> dict:
    folder = Path(tempfile.mkdtemp())
    rows = [{"id": f"p{i:04d}", "prompt": text} for i, text in enumerate(prompts(images))]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "reversed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    suite = load_suite(str(folder / "prompts.jsonl"))
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
    # the reproducibility contract on this card: the same prompts in reverse order (other chunks) give
    # the same bytes per (prompt id, sample index) for this compute batch
    suite_name = suite.card.name
    backwards = load_suite(str(folder / "reversed.jsonl"))
    backwards = dataclasses.replace(backwards, card=dataclasses.replace(backwards.card, name=suite_name))
    bench_generate.generate_stage(card, backwards, folder / "reversed", device=DEVICE.type)
    forward = {r["prompt_id"]: r["sha256"] for r in read_manifest(folder / "timed" / card.name / suite_name)}
    reverse = {r["prompt_id"]: r["sha256"] for r in read_manifest(folder / "reversed" / card.name / suite_name)}
    return {
        "images_per_s": images / seconds,
        "seconds": seconds,
        "first_call_s": first,
        "stages_s": timer.seconds,
        "bit_identical_in_reverse_order": forward == reverse,
    }


_COMPILED = {}


def compiled_parts(backbone):
    """Copies of the transformer and the VAE, compiled as a card with ``compile: true`` gets them
    (:func:`rtdmd.backbones.base.compile_for_sampling`); the eager side and diffusers keep the originals."""
    if not _COMPILED:
        import copy

        vae, net = backbone.vae, copy.deepcopy(backbone.transformer)
        backbone.vae = copy.deepcopy(vae)
        compile_for_sampling(backbone, net)
        _COMPILED.update(net=net, vae=backbone.vae)
        backbone.vae = vae
    return _COMPILED["net"], _COMPILED["vae"]


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


def decode_variants(backbone, resolution: int, batch: int = 8, reps: int = 5) -> dict:
    """VAE decode of ``batch`` latents: eager, channels-last, channels-last with the decoder compiled; ms per
    image, whether two calls give the same bits, and the largest difference from eager."""
    import copy

    shape = (batch, *backbone.latent_shape(resolution, resolution))
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16)
    eager_vae = backbone.vae
    results, reference = {}, None
    variants = {
        "eager": lambda vae: vae,
        "channels_last": lambda vae: vae.to(memory_format=torch.channels_last),
        "channels_last_compiled": lambda vae: (vae.to(memory_format=torch.channels_last), vae.decoder.compile())[0],
    }
    for name, make in variants.items():
        backbone.vae = make(copy.deepcopy(eager_vae)) if name != "eager" else eager_vae
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            first = backbone.decode(latents)
            sync()
            first_s = time.perf_counter() - start
            backbone.decode(latents)
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                again = backbone.decode(latents)
            sync()
        ms = (time.perf_counter() - start) / reps / batch * 1000
        reference = first if reference is None else reference
        results[name] = {
            "ms_per_image": ms,
            "first_call_s": first_s,
            "repeatable": bool(torch.equal(first, again)),
            "max_abs_diff_vs_eager": float((first - reference).abs().max()),
        }
        print(name, json.dumps(results[name]), flush=True)
    backbone.vae = eager_vae
    return results


def versions() -> dict:
    return {
        name: metadata.version(name) for name in ("torch", "diffusers", "transformers") if metadata.distribution(name)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd35m", choices=sorted(FAMILY_OF))
    parser.add_argument("--resolution", default="1024", help="one or more, comma-separated")
    parser.add_argument("--images", type=int, default=16, help="images per timed measurement")
    parser.add_argument("--student-batches", default="1,4,8")
    parser.add_argument("--teacher-batches", default="1,4")
    parser.add_argument("--sides", default="diffusers,rtdmd,rtdmd-compiled", help="which sides to time")
    parser.add_argument(
        "--compile-diffusers",
        action="store_true",
        help="also time diffusers with its transformer compiled (batches >= 4: each shape recompiles for minutes)",
    )
    parser.add_argument("--limits", action="store_true", help="FLOP- and weight-bound ceilings beside each row")
    parser.add_argument("--decode-variants", action="store_true", help="time VAE decode variants first")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test of this script")
    parser.add_argument("--out", default="generate_speed.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers users run it; both sides alike
    start = time.perf_counter()
    backbone = build_backbone(args.family, args.tiny, DEVICE)
    build_s = time.perf_counter() - start
    sides = args.sides.split(",")
    resolutions = [int(r) for r in args.resolution.split(",")]
    decode = decode_variants(backbone, resolutions[0]) if args.decode_variants else None
    plan = [
        (res, mode, int(b))
        for res in resolutions
        for mode, batches in (("student", args.student_batches), ("teacher", args.teacher_batches))
        for b in batches.split(",")
        if b
    ]
    record = {
        "script": "bench/perf/generate_speed.py",
        "command": " ".join(sys.argv),
        "card": torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "python": platform.python_version(),
        "family": args.family,
        "resolutions": resolutions,
        "images": args.images,
        "build_s": build_s,
        "decode_variants": decode,
        "rows": [],
    }
    rows = record["rows"]

    def keep(row: dict) -> None:  # written row by row: a call cut at its time limit keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    for res, mode, batch in plan:
        row = {"resolution": res, "mode": mode, "batch": batch}
        if args.limits:
            row["limits"] = limits(backbone, args.family, mode, batch, res)
        if "diffusers" in sides:
            row["diffusers"] = diffusers_pipe(backbone, mode, batch, args.images, res)
        if "rtdmd" in sides:
            row["rtdmd"] = ours(backbone, args.family, mode, batch, args.images, res)
        if "rtdmd-compiled" in sides:
            row["rtdmd_compiled"] = ours(backbone, args.family, mode, batch, args.images, res, True)
        keep(row)
    if args.compile_diffusers:
        backbone.pipe.transformer.compile()
        for res, mode, batch in [p for p in plan if p[2] >= 4]:
            compiled = diffusers_pipe(backbone, mode, batch, args.images, res)
            keep({"resolution": res, "mode": mode, "batch": batch, "diffusers_compiled": compiled})
    print_table(record)


def print_table(record: dict) -> None:
    merged: dict[tuple, dict] = {}
    for r in record["rows"]:
        merged.setdefault((r["resolution"], r["mode"], r["batch"]), {}).update(r)
    table = Table(title=f"{record['family']}, {record['images']} images, {record['card']} (images/s)")
    sides_shown = ("diffusers", "diffusers_compiled", "rtdmd", "rtdmd_compiled")
    for col in ("px", "mode", "batch", *sides_shown, "best rtdmd / best diffusers", "FLOP / weight bound"):
        table.add_column(col)
    for (res, mode, batch), r in merged.items():
        rate = {k: r[k]["images_per_s"] for k in sides_shown if k in r}
        ours_best = max([rate[k] for k in ("rtdmd", "rtdmd_compiled") if k in rate], default=None)
        theirs_best = max([rate[k] for k in ("diffusers", "diffusers_compiled") if k in rate], default=None)
        ratio = f"{ours_best / theirs_best:.2f}" if ours_best and theirs_best else "–"
        bound = r.get("limits") or {}
        ceilings = "–"
        if bound.get("flop_bound_images_per_s"):
            ceilings = f"{bound['flop_bound_images_per_s']:.2f} / {bound['weight_bound_images_per_s']:.2f}"
        table.add_row(
            str(res), mode, str(batch), *(f"{rate[k]:.2f}" if k in rate else "–" for k in sides_shown), ratio, ceilings
        )
    Console().print(table)


if __name__ == "__main__":
    main()
