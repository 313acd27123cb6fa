"""Seconds per stage-1 training iteration, peak memory and MFU, at real model size with random weights.

One iteration = one fake-score update + one generator update (``fake_updates_per_generator=1``),
exactly the code path of ``rtdmd-train distill`` (``train_step``), with the packaged config's
values (LoRA rank 32, AC-DMD with consistency, teacher CFG, bf16 autocast, gradient checkpointing),
the released checkpoints' component sizes (``bench/perf/real_sizes.py``) and random weights.

    python bench/perf/distill_step.py --family sd35m --out results.json [--batch 9] [--steps 5]
        [--variant NAME:OVERRIDES ...] [--profile]
    torchrun --nproc_per_node 8 bench/perf/distill_step.py --family flux1_dev --variant fsdp:distributed=fsdp

``--batch`` is per GPU: under ``torchrun`` the global batch is ``batch x processes``, split by the
training code's seeding contract, and a variant's ``distributed=ddp|fsdp`` wraps the trainable roles
(the packaged configs' default is DDP; one process wraps nothing). Rank 0 prints and writes; the peak
memory is the largest of any GPU, the MFU per GPU.

Each ``--variant`` is a config (``key=value`` overrides separated by ``;``, applied after
``--batch`` and ``--resolution``, so a variant may set ``batch_size``, the global batch as in the
config, or ``height``/``width``)
measured on the same backbone and steps in the same process: by default the packaged config (``plain``: eager,
gradient checkpointing), every role's blocks compiled, and compiled without checkpointing. Eager
variants come first: a compiled teacher stays compiled (and its copies with it) for the rest of the
process.

The cost of an iteration depends on the random stop K of each update (1 to 4 generator steps are
simulated), so the timed steps are listed with their K. Model FLOPs are counted with
``torch.utils.flop_counter`` on the same steps at batch 1, eager and without gradient checkpointing
(so recomputation is not counted), and scaled by the batch; MFU divides them by the measured time
and the card's dense bf16 peak. ``--profile`` adds one profiled iteration per variant: the kernels
by device time and the fraction of the iteration the device was busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.perf.real_sizes import FAMILIES  # noqa: E402
from rtdmd import distributed, testing  # noqa: E402
from rtdmd.config import load  # noqa: E402
from rtdmd.flops import peak_flops  # noqa: E402
from rtdmd.train.distill import build_session, train_step  # noqa: E402
from rtdmd.train.distill_config import DistillConfig  # noqa: E402

COMPILED = "compile=[teacher,generator,fake]"
VARIANTS = ("plain:", f"compiled:{COMPILED}", f"compiled-no-checkpointing:{COMPILED};gradient_checkpointing=false")

PROMPTS = tuple(f"a photo of object number {i}, highly detailed, studio lighting" for i in range(64))
TINY = {
    "sd3_pipeline": testing.TINY_SD3,
    "flux1_pipeline": testing.tiny_flux1_sizes(True),
    "flux2_klein_pipeline": testing.TINY_FLUX2_KLEIN,
}


def build_backbone(family: str, tiny: bool, device: torch.device):
    sizes, builder, adapter_path, text_len = FAMILIES[family]
    sizes = TINY[builder] if tiny else sizes
    with torch.device(device):
        pipe = getattr(testing, builder)(sizes)
    pipe = pipe.to(torch.bfloat16)
    module, name = adapter_path.split(":")
    return getattr(importlib.import_module(module), name)(pipe, max_sequence_length=text_len)


def parse_variants(parser: argparse.ArgumentParser, texts: list[str]) -> list[tuple[str, list[str]]]:
    """``NAME:key=value;key=value`` -> (name, overrides), eager variants before compiled ones (a
    compiled teacher stays compiled, and copies of it too, for the rest of the process)."""
    variants = []
    for text in texts:
        name, _, rest = text.partition(":")
        variants.append((name, [o for o in rest.split(";") if o]))
    compiled = [any(o.startswith("compile=") and o != "compile=[]" for o in v[1]) for v in variants]
    if compiled != sorted(compiled):
        parser.error("eager variants come first: a compiled teacher stays compiled for the rest of the process")
    return variants


def variant_config(base: list[str], overrides: list[str], family: str) -> DistillConfig:
    """The packaged config with ``base`` (the command line's batch and resolution) and then the
    variant's ``overrides``; what a benchmark cannot have is replaced after."""
    cfg = load(DistillConfig, family, [*base, *overrides], group="distill")
    return dataclasses.replace(
        cfg,
        prompt_file="",
        prompts=PROMPTS,
        fake_updates_per_generator=1,
        eval=dataclasses.replace(cfg.eval, every=0),
        precision="bfloat16",
        generator=dataclasses.replace(
            cfg.generator, source=""
        ),  # random weights: the generator starts from the teacher
    )


def time_steps(sess, steps: int, device: torch.device) -> tuple[list[dict], float, float | None]:
    """One warm-up iteration (compilation happens here), then ``steps`` timed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    train_step(sess, 0)
    sync()
    first = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for step in range(1, steps + 1):
        t = time.perf_counter()
        logs = distributed.reduce_logs(train_step(sess, step))  # means over the global batch, as the loop logs
        sync()
        rows.append(
            {
                "step": step,
                "seconds": time.perf_counter() - t,
                "fake_stop": int(logs["train/fake_stop"]),
                "generator_stop": int(logs["train/gen_stop"]),
                "loss_fake": logs["loss/fake"],
                "loss_generator": logs["loss/generator"],
            }
        )
    return rows, first, peak_memory_gib(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The fullest GPU's peak allocated memory since the last reset, GiB (None on the CPU). Under torchrun
    every rank calls it: a collective."""
    if device.type != "cuda":
        return None
    return float(distributed.max_across(torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=device)))


def profile_step(sess, step: int, device: torch.device) -> dict:
    """One iteration under ``torch.profiler``: the kernels by self device time (top 25) and how busy the
    device was (the sum of kernel times over the wall time: far below 1 means launch- or host-bound)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        train_step(sess, step)
        sync()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    if device.type == "cuda":
        # the kernels' rows only: an aten op's row repeats its kernels' device time
        attr = "self_device_time_total"
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
    else:
        attr = "self_cpu_time_total"
        busy = sum(e.self_cpu_time_total for e in events) / 1e6
    return {
        "wall_seconds": wall,
        "kernel_seconds": busy,
        "busy_fraction": busy / wall,
        "table": events.table(sort_by=attr, row_limit=25),
    }


def count_step_flops(sess, cfg: DistillConfig, steps: int, processes: int) -> float:
    """Model FLOPs per GPU and iteration of steps 1..``steps``: one sample per process, eager, no
    recomputation, times the per-GPU batch."""
    from torch.utils.flop_counter import FlopCounterMode

    sess.cfg = dataclasses.replace(cfg, batch_size=processes)
    for net in (sess.generator, sess.models.fake_run):
        getattr(net, "module", net).disable_gradient_checkpointing()  # DDP keeps the net in .module
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        for step in range(1, steps + 1):
            train_step(sess, step)
    return counter.get_total_flops() * (cfg.batch_size // processes) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--resolution", type=int, default=0, help="default: the config's training resolution")
    parser.add_argument("--batch", type=int, default=9, help="images per GPU per update (official: 9)")
    parser.add_argument("--steps", type=int, default=4, help="timed iterations after one warm-up")
    parser.add_argument("--variant", action="append", help=f"NAME:OVERRIDES (repeatable; default: {VARIANTS})")
    parser.add_argument("--profile", action="store_true", help="also profile one iteration per variant")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test of this script")
    parser.add_argument("--out", default="distill_step.json")
    args = parser.parse_args()
    variants = parse_variants(parser, args.variant or VARIANTS)

    world = distributed.init("auto")
    device = world.device
    console = Console(quiet=not world.is_main)  # rank 0 reports
    base = [f"batch_size={args.batch * world.size}"]
    if args.resolution:
        base += [f"height={args.resolution}", f"width={args.resolution}"]
    t0 = time.perf_counter()
    backbone = build_backbone(args.family, args.tiny, device)
    build_s = time.perf_counter() - t0
    peak = peak_flops(device)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers", "peft")},
        "family": args.family,
        "processes": world.size,
        "sizes": "tiny" if args.tiny else "released",
        "build_seconds": build_s,
        "peak_bf16_dense_tflops_assumed": peak / 1e12 if peak else None,
        "variants": [],
    }
    table = Table(title=f"stage-1 iteration · {args.family} · {world.size} x {record['device']}")
    columns = ("variant", "px", "batch", "first call s", "s / iteration", "FLOP bound s", "peak GiB", "MFU")
    for col in (*columns, "loss fake", "loss gen"):
        table.add_column(col, justify="right")
    for name, overrides in variants:
        cfg = variant_config(base, overrides, args.family)
        if cfg.batch_size % world.size:  # a variant's batch_size is the config's: all processes together
            parser.error(
                f"variant {name}: batch_size={cfg.batch_size} (global) does not split over {world.size} processes"
            )
        try:
            sess = build_session(cfg, world, Path(tempfile.mkdtemp()), backbone=backbone)
            rows, first_s, peak_gib = time_steps(sess, args.steps, device)
        except torch.OutOfMemoryError as err:  # a variant that does not fit is a result, not a crash
            if world.size > 1:  # the other ranks wait in a collective: stop them all
                raise
            record["variants"].append({"name": name, "overrides": overrides, "error": str(err).splitlines()[0]})
            table.add_row(name, str(cfg.height), str(args.batch), "", "out of memory", "", "", "", "", "")
            sess = None
            release_memory(device)
            continue
        mean_s = sum(r["seconds"] for r in rows) / len(rows)
        profiled = profile_step(sess, 1, device) if args.profile else None
        flops_per_iter = count_step_flops(sess, cfg, args.steps, world.size)
        mfu = flops_per_iter / mean_s / peak if peak else None
        record["variants"].append(
            {
                "name": name,
                "overrides": overrides,
                "resolution": cfg.height,
                "distributed": cfg.distributed if world.size > 1 else "none",
                "batch_per_gpu": cfg.batch_size // world.size,
                "gradient_checkpointing": cfg.gradient_checkpointing,
                "compile": list(cfg.compile),
                "lora_rank": cfg.generator.lora.rank if cfg.generator.lora else None,
                "first_call_seconds": first_s,
                "steps": rows,
                "seconds_per_iteration": mean_s,
                "peak_memory_gib": peak_gib,
                "model_tflops_per_iteration": flops_per_iter / 1e12,
                "mfu": mfu,
                "profile": profiled,
            }
        )
        if profiled:
            console.print(f"{name}: device busy {100 * profiled['busy_fraction']:.0f}% of the iteration")
            console.print(profiled["table"], markup=False, highlight=False)
        table.add_row(
            name,
            str(cfg.height),
            str(cfg.batch_size // world.size),
            f"{first_s:.1f}",
            f"{mean_s:.3f}",
            "-" if not peak else f"{flops_per_iter / peak:.3f}",
            "-" if peak_gib is None else f"{peak_gib:.1f}",
            "-" if mfu is None else f"{100 * mfu:.1f}%",
            f"{rows[0]['loss_fake']:.5g}",
            f"{rows[0]['loss_generator']:.5g}",
        )
        if world.is_main:  # each variant kept if a later one is cut off
            Path(args.out).write_text(json.dumps(record, indent=2))
        del sess
        release_memory(device)
    console.print(table)
    if world.is_main:
        Path(args.out).write_text(json.dumps(record, indent=2))
    distributed.shutdown()


def release_memory(device: torch.device) -> None:
    """Free what a finished variant held, so the next one starts from the same memory."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
