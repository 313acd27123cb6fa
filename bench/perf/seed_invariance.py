"""Check the sampler's reproducibility contract on a device, at a realistic model size.

For an SD3.5-Medium-sized random ``SD3Transformer2DModel`` (24 joint blocks, width 1536; random
weights are fine for this) driven by the ``tiny`` adapter's byte text encoder and pixel codec, it
generates 7 images in one call, each image alone, and all 7 in shuffled order, for a CPS student
spec and an Euler+CFG teacher spec, and reports whether every image is bit-identical, plus the
sampling time per image for several ``compute_batch`` sizes.

    python bench/perf/seed_invariance.py --out results.json [--layers 24] [--resolution 512]

Prints a table and writes JSON with the device, library versions and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.perf.real_sizes import SD35_MEDIUM  # noqa: E402
from rtdmd.backbones.tiny import ByteTextEncoder, TinyBackbone  # noqa: E402
from rtdmd.flow.schedules import RTDMD_TIMESTEPS  # noqa: E402
from rtdmd.sampling import SamplerSpec, generate  # noqa: E402

PROMPTS = [
    f"prompt {i}: a {c} object on a table"
    for i, c in enumerate(["red", "green", "blue", "cyan", "pink", "black", "white"])
]
KEYS = [(f"p{i}", i % 2) for i in range(7)]
SPECS = {
    "student cps 4 steps": SamplerSpec(num_steps=4, eta=0.9, guidance=1.0, timesteps=RTDMD_TIMESTEPS),
    "teacher euler 8 steps cfg 4.5": SamplerSpec(num_steps=8, eta=0.0, guidance=4.5),
}


def build(layers: int, dtype: torch.dtype, device: torch.device) -> TinyBackbone:
    """SD3.5-Medium's transformer (``layers`` deep) on the tiny adapter's 48-channel pixel latent."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sizes = SD35_MEDIUM["transformer"] | dict(
        in_channels=48, out_channels=48, num_layers=layers, dual_attention_layers=tuple(range(min(13, layers)))
    )
    transformer = SD3Transformer2DModel(**sizes)
    text = ByteTextEncoder(dim=4096, pooled_dim=2048, max_length=77)
    return TinyBackbone(transformer.to(device, dtype).eval(), text.to(device, dtype).eval())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="seed_invariance.json")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--compute-batches", default="1,4,8")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = build(args.layers, getattr(torch, args.dtype), device)
    res = args.resolution
    rows = []
    for name, spec in SPECS.items():
        for cb in [int(c) for c in args.compute_batches.split(",")]:
            run = partial(
                generate, backbone, backbone.transformer, spec=spec, run_seed=3, height=res, width=res, compute_batch=cb
            )
            run(PROMPTS[:1], KEYS[:1])  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            batch = run(PROMPTS, KEYS)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            alone = torch.cat([run(PROMPTS[i : i + 1], KEYS[i : i + 1]) for i in range(7)])
            order = [3, 6, 0, 5, 1, 4, 2]
            shuffled = run([PROMPTS[i] for i in order], [KEYS[i] for i in order])
            rows.append(
                {
                    "spec": name,
                    "compute_batch": cb,
                    "alone_equal": bool(torch.equal(alone, batch)),
                    "shuffled_equal": bool(torch.equal(shuffled, batch[order])),
                    "max_abs_diff_alone": float((alone - batch).abs().max()),
                    "finite": bool(torch.isfinite(batch).all()),
                    "seconds_per_image_batch7": seconds / 7,
                }
            )
    table = Table(title=f"seed invariance · {device} · {args.dtype} · {args.layers} layers · {res}px")
    for col in (
        "spec",
        "compute_batch",
        "alone == batch",
        "shuffled == batch",
        "max |diff|",
        "s/image (7 in one call)",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["spec"],
            str(r["compute_batch"]),
            str(r["alone_equal"]),
            str(r["shuffled_equal"]),
            f"{r['max_abs_diff_alone']:.2e}",
            f"{r['seconds_per_image_batch7']:.3f}",
        )
    Console().print(table)
    record = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers")},
        "args": vars(args),
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=2)


if __name__ == "__main__":
    main()
