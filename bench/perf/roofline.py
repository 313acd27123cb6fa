"""Roofline ceilings for generation and training, from model FLOPs counted on the meta device.

For a family at released size (no weights are materialised: every tensor lives on ``meta``, so this
runs on any CPU in seconds) and each resolution: the transformer's FLOPs for one forward of one image
(``torch.utils.flop_counter``; the text length of the family's cards), the VAE decoder's, and the
transformer's weight bytes. From them, for a card with dense bf16 peak ``P`` and memory bandwidth ``W``:

* FLOP-bound images/s = ``P / (num_steps x forwards_per_step x F_transformer + F_decode)``;
* weight-bound images/s = ``batch x W / (num_steps x weight_bytes)`` (each step reads every weight once
  per compute batch; CFG's two branches share one batch);

the lower one is the ceiling a path approaches at that batch (the measurements sit beside them in
``bench/perf/results/README.md``).

    python bench/perf/roofline.py --family sd35m --resolutions 512,1024 --out roofline.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.perf.real_sizes import FAMILIES  # noqa: E402
from rtdmd import testing  # noqa: E402
from rtdmd.backbones.base import Cond  # noqa: E402
from rtdmd.flops import PEAK_BF16_DENSE, PEAK_HBM_BYTES, count_flops  # noqa: E402

MODES = {"student": (4, 1), "teacher": (10, 2)}  # (num_steps, forwards per step: CFG's two branches)


def meta_backbone(family: str):
    sizes, builder, adapter_path, text_len = FAMILIES[family]
    with torch.device("meta"):
        pipe = getattr(testing, builder)(sizes)
    pipe = pipe.to(torch.bfloat16)
    module, name = adapter_path.split(":")
    return getattr(importlib.import_module(module), name)(pipe, max_sequence_length=text_len)


def text_condition(backbone) -> Cond:
    """The family's text encoding of one prompt on the meta device; Qwen3 (FLUX.2) reads a value
    (``.item()``), which meta tensors cannot give: then zeros of the shape it returns, which is all a
    FLOP count needs."""
    try:
        return backbone.encode(["a photo of a cat on a wooden table"], guidance=1.0)
    except RuntimeError:
        width = backbone.transformer.config.joint_attention_dim
        shape = (1, backbone.max_sequence_length, width)
        return Cond({"prompt_embeds": torch.zeros(shape, device="meta", dtype=torch.bfloat16)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd35m", choices=sorted(FAMILIES))
    parser.add_argument("--resolutions", default="512,1024")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--card", default="H200", choices=sorted(PEAK_BF16_DENSE))
    parser.add_argument("--out", default="roofline.json")
    args = parser.parse_args()
    backbone = meta_backbone(args.family)
    weight_bytes = sum(p.numel() * p.element_size() for p in backbone.transformer.parameters())
    peak, bandwidth = PEAK_BF16_DENSE[args.card], PEAK_HBM_BYTES[args.card]
    cond = text_condition(backbone)
    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        x = torch.zeros(1, *backbone.latent_shape(res, res), device="meta", dtype=torch.bfloat16)
        forward = count_flops(lambda x=x: backbone.velocity(backbone.transformer, x, 0.5, cond, 1.0))
        decode = count_flops(lambda x=x: backbone.decode(x))
        for mode, (steps, branches) in MODES.items():
            per_image = steps * branches * forward + decode
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(
                    {
                        "resolution": res,
                        "mode": mode,
                        "batch": batch,
                        "transformer_tflop_per_forward": forward / 1e12,
                        "decode_tflop": decode / 1e12,
                        "tflop_per_image": per_image / 1e12,
                        "flop_bound_images_per_s": peak / per_image,
                        "weight_bound_images_per_s": batch * bandwidth / (steps * weight_bytes),
                    }
                )
    record = {
        "command": " ".join(["python", *sys.argv]),
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers")},
        "family": args.family,
        "card": args.card,
        "peak_bf16_dense_tflops": peak / 1e12,
        "hbm_bytes_per_s": bandwidth,
        "transformer_weight_gb": weight_bytes / 1e9,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    table = Table(title=f"{args.family} roofline on an {args.card} (images/s ceilings)")
    for col in ("px", "mode", "batch", "TFLOP / image", "FLOP bound", "weight bound"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["resolution"]),
            r["mode"],
            str(r["batch"]),
            f"{r['tflop_per_image']:.1f}",
            f"{r['flop_bound_images_per_s']:.2f}",
            f"{r['weight_bound_images_per_s']:.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
