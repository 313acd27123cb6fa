"""LoRA numerics on the toy world: float32 LoRA (our default) against the official bf16 LoRA.

The official trainer injects peft LoRA into a bf16 model and never casts it up, so the LoRA weights,
their AdamW moments and the EMA live in bf16, where an update smaller than about 2^-8 of a weight
rounds away. Both arms here run the toy AC-DMD recipe (``rtdmd-train distill --config toy``) on a
bf16 teacher with the same seed, steps and learning rate; they differ only in
``generator.lora.dtype`` / ``fake.lora.dtype`` (``float32`` or ``base``). Each learning rate in
``--lrs`` gives one pair (the toy recipe's 2e-4 and the official stage-1 scale). Afterwards the harness
generates the suite with each arm's EMA generator (float64 sampling, as the toy method cards) and
scores toy GenEval, toy-clip and toy-fd, with the float32 arm as the paired reference.

    python bench/perf/lora_numerics.py --steps 500 --lrs 2e-4,3e-6 --out lora_numerics.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.aggregate import aggregate_stage  # noqa: E402
from bench.generate import generate_stage  # noqa: E402
from bench.methods import LoraEntry, load_method  # noqa: E402
from bench.score import score_stage  # noqa: E402
from rtdmd.suites import load_suite  # noqa: E402

ARMS = ("float32", "base")
METRICS = ["toy-geneval", "toy-clip", "toy-fd"]


def train_command(run: Path, dtype: str, lr: str, steps: int, device: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rtdmd.train.cli",
        "distill",
        "--config",
        "toy",
        f"run_dir={run}",
        "backbone.dtype=bfloat16",
        f"generator.lora.dtype={dtype}",
        f"fake.lora.dtype={dtype}",
        f"generator.optim.lr={lr}",
        f"fake.optim.lr={lr}",
        f"steps={steps}",
        f"checkpoint_every={steps}",
        "eval.every=0",
        f"device={device}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lrs", default="2e-4,3e-6", help="comma-separated learning rates, one pair of arms each")
    parser.add_argument("--suite", default="toy-geneval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default="runs/lora_numerics")
    parser.add_argument("--out", default="lora_numerics.json")
    args = parser.parse_args()

    work = Path(args.work)
    lrs = [lr.strip() for lr in args.lrs.split(",") if lr.strip()]
    runs = {(lr, dtype): work / f"lr{lr}-{dtype}" for lr in lrs for dtype in ARMS}
    t0 = time.perf_counter()
    procs = {
        key: subprocess.Popen(train_command(run, key[1], key[0], args.steps, args.device), env=os.environ.copy())
        for key, run in runs.items()
    }  # side by side: the toy model leaves the card mostly idle
    for key, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"training {key} failed with exit code {proc.returncode}")
    train_seconds = time.perf_counter() - t0

    suite = load_suite(args.suite)
    base = load_method("toy-acdmd")
    results = []
    for lr in lrs:
        out = work / f"bench-lr{lr}"
        for dtype in ARMS:  # float32 first: it is the paired reference
            method = dataclasses.replace(
                base,
                name=f"lora-{dtype}",
                display=f"LoRA {dtype}",
                loras=(LoraEntry(source=str(runs[(lr, dtype)]), kind="rtdmd"),),
            )
            root = generate_stage(method, suite, out, seeds=(0,), device=args.device)["run_dir"]
            score_stage(root, METRICS, device=args.device)
            summary = aggregate_stage(root, reference="" if dtype == "float32" else "lora-float32")
            stats = [json.loads(line) for line in (runs[(lr, dtype)] / "stats.jsonl").read_text().splitlines()]
            results.append(
                {
                    "lr": float(lr),
                    "lora_dtype": dtype,
                    "metrics": summary["metrics"],
                    "final_loss_generator": next(
                        (r["loss/generator"] for r in reversed(stats) if "loss/generator" in r), None
                    ),
                }
            )
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "peft")},
        "steps": args.steps,
        "suite": args.suite,
        "train_seconds": train_seconds,
        "results": results,
    }
    print(f"{'lr':>8} {'LoRA':>8} {'toy GenEval':>12} {'vs float32 [95%], p':>30} {'toy-clip':>9} {'toy-fd':>8}")
    for r in results:
        m = r["metrics"]
        ref = m["toy-geneval"].get("vs_reference")
        vs = f"{ref['diff']:+.3f} [{ref['ci_low']:+.3f}, {ref['ci_high']:+.3f}], {ref['p_value']:.3g}" if ref else "-"
        print(
            f"{r['lr']:>8.0e} {r['lora_dtype']:>8} {m['toy-geneval']['value']:>12.3f} {vs:>30} "
            f"{m['toy-clip']['value']:>9.3f} {m['toy-fd']['value']:>8.2f}"
        )
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
