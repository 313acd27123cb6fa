"""Seconds per stage-1 training iteration, peak memory and MFU, at real model size with random weights.

One iteration = one fake-score update + one generator update (``fake_updates_per_generator=1``),
exactly the code path of ``rtdmd-train distill`` (``train_step``), with the packaged config's
values (LoRA rank 32, AC-DMD with consistency, teacher CFG, bf16 autocast, gradient checkpointing),
the released checkpoints' component sizes (``bench/perf/real_sizes.py``) and random weights.

    python bench/perf/distill_step.py --family sd35m --out results.json [--batch 9] [--steps 5]

The cost of an iteration depends on the random stop K of each update (1 to 4 generator steps are
simulated), so the timed steps are listed with their K. Model FLOPs are counted with
``torch.utils.flop_counter`` on the same steps at batch 1 without gradient checkpointing (so
recomputation is not counted) and scaled by the batch; MFU divides them by the measured time and
the card's dense bf16 peak.
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
from rtdmd.train.distill_config import DistillConfig

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--resolution", type=int, default=0, help="default: the config's training resolution")
    parser.add_argument("--batch", type=int, default=9, help="images per GPU per update (official: 9)")
    parser.add_argument("--steps", type=int, default=5, help="timed iterations after one warm-up")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test of this script")
    parser.add_argument("--out", default="distill_step.json")
    args = parser.parse_args()

    world = distributed.init("auto")
    device = world.device
    cfg = load(DistillConfig, args.family, group="distill")
    res = args.resolution or cfg.height
    cfg = dataclasses.replace(
        cfg,
        prompt_file="",
        prompts=PROMPTS,
        batch_size=args.batch,
        fake_updates_per_generator=1,
        distributed="none",
        eval=dataclasses.replace(cfg.eval, every=0),
        height=res,
        width=res,
        precision="bfloat16",
        generator=dataclasses.replace(
            cfg.generator, source=""
        ),  # random weights: the generator starts from the teacher
    )
    t0 = time.perf_counter()
    backbone = build_backbone(args.family, args.tiny, device)
    sess = build_session(cfg, world, Path(tempfile.mkdtemp()), backbone=backbone)
    build_s = time.perf_counter() - t0

    train_step(sess, 0)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        logs = train_step(sess, step)
        sync()
        rows.append(
            {
                "step": step,
                "seconds": time.perf_counter() - t,
                "fake_stop": int(logs["train/fake_stop"]),
                "generator_stop": int(logs["train/gen_stop"]),
            }
        )
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    mean_s = sum(r["seconds"] for r in rows) / len(rows)

    # model FLOPs of the same steps: batch 1, no recomputation, scaled by the batch
    from torch.utils.flop_counter import FlopCounterMode

    sess.cfg = dataclasses.replace(cfg, batch_size=1)
    for net in (sess.generator, sess.models.fake_run):
        net.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as counter:
        for step in range(1, args.steps + 1):
            train_step(sess, step)
    flops_per_iter = counter.get_total_flops() * args.batch / args.steps
    peak = peak_flops(device)
    mfu = flops_per_iter / mean_s / peak if peak else None

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers", "peft")},
        "family": args.family,
        "sizes": "tiny" if args.tiny else "released",
        "resolution": res,
        "batch_per_gpu": args.batch,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "lora_rank": cfg.generator.lora.rank if cfg.generator.lora else None,
        "build_seconds": build_s,
        "steps": rows,
        "seconds_per_iteration": mean_s,
        "peak_memory_gib": peak_gib,
        "model_tflops_per_iteration": flops_per_iter / 1e12,
        "peak_bf16_dense_tflops_assumed": peak / 1e12 if peak else None,
        "mfu": mfu,
    }
    table = Table(title=f"stage-1 iteration · {args.family} · {res}px · batch {args.batch} · {record['device']}")
    for col in ("step", "K fake", "K gen", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["step"]), str(r["fake_stop"]), str(r["generator_stop"]), f"{r['seconds']:.3f}")
    Console().print(table)
    Console().print(
        f"mean {mean_s:.3f} s/iteration · peak memory {peak_gib if peak_gib is None else f'{peak_gib:.1f} GiB'} · "
        f"model {flops_per_iter / 1e12:.1f} TFLOP/iteration · MFU {mfu if mfu is None else f'{100 * mfu:.1f}%'}"
    )
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
