"""Reward throughput at the released models' sizes (random weights), ours batched vs a per-image loop.

For each metric: images per second of

* ``ours fp32`` / ``ours bf16``: the differentiable tensor path, ``--batch-size`` images per
  forward, under ``no_grad`` (as the benchmark harness scores);
* ``per-image fp32``: the reference path (PIL preprocessing on the CPU) with one image per forward,
  the loop of the official scripts (``hpsv2.score`` and ImageReward's ``score`` go one image at a
  time);

plus the score drift bf16 brings (max and mean ``|bf16 - fp32|``) and the tensor-vs-reference
difference at this resolution (a real resize: 512 -> 224). Prints a table and writes JSON with the
card, versions and command.

    python bench/perf/rewards.py --out bench/perf/results/rewards_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rtdmd.rewards import clip as clip_rewards
from rtdmd.rewards.base import score
from rtdmd.rewards.weights import WeightFiles
from rtdmd.testing import save_tiny_clip

# sizes of the released config.json files (openai/clip-vit-large-patch14; laion CLIP-ViT-H-14 = PickScore_v1)
CLIP_L14 = {
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    "patch_size": 14,
}
CLIP_H14 = {
    "text": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
    },
    "vision": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
    },
    "patch_size": 14,
}


def build_clipscore(root: Path):
    save_tiny_clip(root / clip_rewards.CLIP_L14.repo, projection_dim=768, sizes=CLIP_L14)
    return lambda dtype: clip_rewards.ClipScore(root, dtype=dtype)


def build_aesthetic(root: Path):
    if not (root / clip_rewards.CLIP_L14.repo).exists():
        save_tiny_clip(root / clip_rewards.CLIP_L14.repo, projection_dim=768, sizes=CLIP_L14)
    (root / "urls").mkdir(exist_ok=True)
    mlp = clip_rewards.aesthetic_mlp()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, root / "urls" / "mlp.pth")
    clip_rewards.Aesthetic.weights = (clip_rewards.CLIP_L14, WeightFiles(url="https://example.invalid/mlp.pth"))
    return lambda dtype: clip_rewards.Aesthetic(root, dtype=dtype)


def build_pickscore(root: Path):
    save_tiny_clip(
        root / clip_rewards.PICKSCORE_V1.repo,
        root / clip_rewards.CLIP_H14_PROCESSOR.repo,
        projection_dim=1024,
        sizes=CLIP_H14,
        logit_scale=4.6052,
    )
    return lambda dtype: clip_rewards.PickScore(root, dtype=dtype)


BUILDERS = {"clipscore": build_clipscore, "aesthetic": build_aesthetic, "pickscore": build_pickscore}


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def measure(name: str, make, images: torch.Tensor, prompts: list[str], args, device: torch.device) -> dict:
    row: dict = {"metric": name}
    scores = {}
    for dtype in ("float32", "bfloat16"):
        reward = make(dtype)
        score(reward, images[: args.batch_size], prompts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        scores[dtype], seconds = timed(lambda r=reward: score(r, images, prompts, batch_size=args.batch_size), device)
        row[f"ours_{dtype}_images_per_s"] = len(prompts) / seconds
        if dtype == "float32":
            n = args.per_image
            reward.reference(images[:1].cpu(), prompts[:1], device)  # warm-up
            reference, seconds = timed(
                lambda r=reward, n=n: torch.cat(
                    [r.reference(images[i : i + 1].cpu(), prompts[i : i + 1], device).cpu() for i in range(n)]
                ),
                device,
            )
            row["per_image_float32_images_per_s"] = n / seconds
            row["tensor_vs_reference_max_abs"] = float((scores[dtype][:n] - reference).abs().max())
        del reward
        if device.type == "cuda":
            row[f"peak_memory_{dtype}_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.empty_cache()
    drift = (scores["bfloat16"] - scores["float32"]).abs()
    row["bf16_drift_max_abs"], row["bf16_drift_mean_abs"] = float(drift.max()), float(drift.mean())
    row["score_mean_float32"] = float(scores["float32"].mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", default=",".join(BUILDERS))
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--per-image", type=int, default=32, help="images scored one by one (the slow loop)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.num_images, 3, args.resolution, args.resolution, generator=gen).to(device)
    prompts = [f"a photo of object number {i}, highly detailed" for i in range(args.num_images)]
    rows = []
    for name in args.metrics.split(","):
        with tempfile.TemporaryDirectory() as root:
            rows.append(measure(name, BUILDERS[name](Path(root)), images, prompts, args, device))
        print(json.dumps(rows[-1]), flush=True)
    import diffusers
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "command": " ".join(["python", *sys.argv]),
        "card": card,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "diffusers": diffusers.__version__,
        },
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    header = f"{'metric':<10} {'ours fp32':>10} {'ours bf16':>10} {'per-image':>10} {'bf16 drift max':>15} {'tensor-ref':>11}"
    print(f"\n{card}, {args.num_images} images at {args.resolution}px, batch {args.batch_size} (images/s)\n{header}")
    for r in rows:
        print(
            f"{r['metric']:<10} {r['ours_float32_images_per_s']:>10.1f} {r['ours_bfloat16_images_per_s']:>10.1f} "
            f"{r['per_image_float32_images_per_s']:>10.1f} {r['bf16_drift_max_abs']:>15.2e} {r['tensor_vs_reference_max_abs']:>11.2e}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
