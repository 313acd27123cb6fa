"""Scaling across GPUs: one global batch on 1, 2, ... N processes (``torchrun``), for stage 1
(``distill_step.py``) or stage 2 (``rl_epoch.py``), each count in its own ``torchrun``.

Per count: seconds per iteration (stage 1) or epoch (stage 2), images per second, efficiency (images
per second per GPU against one GPU's), the fullest GPU's memory, and the largest relative difference
of the logged losses from the one-process run. The project's seeding contract says one global batch
gives the same samples, noise and updates on any world size, so the losses may differ only by the
reduction order and the autocast precision.

    python bench/perf/scaling.py --stage 1 --family sd35m --gpus 1,2,4,8 --global-batch 72 \\
        --variant ddp:distributed=ddp --out scaling_sd35m_stage1.json

``--tiny`` on a machine without GPUs is a CPU smoke test (gloo processes). The sub-runs' own JSON
files are kept inside the record, each with its command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
SCRIPTS = {1: HERE / "distill_step.py", 2: HERE / "rl_epoch.py"}
LOSSES = {1: ("loss_fake", "loss_generator"), 2: ("loss_fake", "loss_dm", "loss_bp")}


def run_count(stage: int, gpus: int, args: argparse.Namespace, out: Path) -> dict:
    """One ``torchrun --nproc_per_node gpus`` of the stage's script at ``global_batch / gpus`` per GPU."""
    if args.global_batch % gpus:
        raise SystemExit(f"global batch {args.global_batch} does not split over {gpus} GPUs")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
    cmd += [str(SCRIPTS[stage]), "--family", args.family, "--batch", str(args.global_batch // gpus)]
    cmd += ["--variant", args.variant, "--out", str(out)]
    if stage == 1:
        cmd += ["--steps", str(args.steps)] + (["--resolution", str(args.resolution)] if args.resolution else [])
    else:
        cmd += ["--iterations", str(args.iterations), "--warmup-iterations", "1"]
        cmd += ["--group", str(args.group or args.global_batch // max(args.gpus_list))]
    if args.tiny:
        cmd.append("--tiny")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{gpus} GPUs failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def seconds_and_losses(stage: int, record: dict) -> tuple[float, list[dict]]:
    """Seconds per iteration (stage 1) or epoch (stage 2) and the logged losses of each timed step."""
    variant = record["variants"][0]
    if "error" in variant:
        raise SystemExit(f"{record['processes']} GPUs: {variant['error']}")
    if stage == 1:
        return variant["seconds_per_iteration"], variant["steps"]
    return variant["seconds_per_epoch"], variant["epochs"]


def largest_relative_difference(rows: list[dict], reference: list[dict], keys: tuple[str, ...]) -> float:
    """``max |a - b| / |b|`` over the steps and losses (``b`` the one-process run's); a loss the arm does
    not have (``None`` in both runs, e.g. no DM or BP term) is skipped, one logged by only one run is
    an error."""
    differences = [0.0]
    for row, ref in zip(rows, reference, strict=True):
        for k in keys:
            if row[k] is None and ref[k] is None:
                continue
            if row[k] is None or ref[k] is None:
                raise SystemExit(f"{k} is logged by one run only: {row[k]} against {ref[k]}")
            differences.append(abs(row[k] - ref[k]) / abs(ref[k]) if ref[k] else abs(row[k]))
    return max(differences)


def summarise(stage: int, global_batch: int, records: dict[int, dict]) -> list[dict]:
    """Per GPU count: seconds, images/s, efficiency against the smallest count (per GPU), peak memory,
    largest loss difference from the smallest count's run."""
    counts = sorted(records)
    base_s, base_rows = seconds_and_losses(stage, records[counts[0]])
    per_unit = global_batch * (records[counts[0]].get("iterations_per_epoch", 1) if stage == 2 else 1)
    base_rate = per_unit / base_s / counts[0]
    out = []
    for n in counts:
        seconds, rows = seconds_and_losses(stage, records[n])
        rate = per_unit / seconds
        out.append(
            {
                "gpus": n,
                "seconds": seconds,
                "images_per_s": rate,
                "efficiency": rate / n / base_rate,
                "peak_memory_gib": records[n]["variants"][0].get("peak_memory_gib"),
                "loss_max_relative_difference": largest_relative_difference(rows, base_rows, LOSSES[stage]),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--family", required=True)
    parser.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated (the first is the reference)")
    parser.add_argument("--global-batch", type=int, required=True, help="images per iteration, all GPUs together")
    parser.add_argument("--group", type=int, default=0, help="stage 2: GRPO group (default: the largest count's share)")
    parser.add_argument("--variant", default="ddp:distributed=ddp", help="NAME:OVERRIDES of the sub-runs")
    parser.add_argument("--steps", type=int, default=3, help="stage 1: timed iterations")
    parser.add_argument("--iterations", type=int, default=4, help="stage 2: sampler iterations per epoch")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke test (gloo)")
    parser.add_argument("--out", default="scaling.json")
    args = parser.parse_args()
    args.gpus_list = [int(n) for n in args.gpus.split(",")]
    folder = Path(tempfile.mkdtemp())
    records = {n: run_count(args.stage, n, args, folder / f"{n}.json") for n in args.gpus_list}
    rows = summarise(args.stage, args.global_batch, records)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "stage": args.stage,
        "family": args.family,
        "global_batch": args.global_batch,
        "rows": rows,
        "runs": {str(n): r for n, r in records.items()},
    }
    Path(args.out).write_text(json.dumps(record, indent=2))
    unit = "iteration" if args.stage == 1 else "epoch"
    table = Table(title=f"stage {args.stage} · {args.family} · global batch {args.global_batch} · {args.variant}")
    for col in ("GPUs", f"s / {unit}", "images/s", "efficiency", "peak GiB", "max loss diff"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["gpus"]),
            f"{r['seconds']:.3f}",
            f"{r['images_per_s']:.2f}",
            f"{100 * r['efficiency']:.0f}%",
            "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
            f"{r['loss_max_relative_difference']:.2e}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
