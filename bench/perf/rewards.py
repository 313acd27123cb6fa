"""Reward throughput at the released models' sizes (random weights), ours batched vs a per-image loop.

For each metric: images per second of

* ``ours fp32`` / ``ours bf16``: the differentiable tensor path, ``--batch-size`` images per
  forward, under ``no_grad`` (as the benchmark harness scores);
* ``per-image fp32``: one image per forward with PIL preprocessing. For ``hpsv2`` and
  ``imagereward`` this is the reference package's own loop (``hpsv2.img_score.score``, which also
  loads the checkpoint on every call, here once for the loop, and runs under CUDA fp16 autocast;
  ``ImageReward.score``; both loops score one prompt),
  set up as in ``tests/parity/`` (which needs ``hpsv2x``, ``image-reward`` and pytest installed);
  for the CLIP family (whose reference scripts batch) it is our reference path, one image at a time;

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
import traceback
from functools import partial
from pathlib import Path

import torch

from rtdmd.rewards import clip as clip_rewards
from rtdmd.rewards.base import score
from rtdmd.rewards.preprocess import to_pil
from rtdmd.testing import save_tiny_clip
from rtdmd.weights import WeightFiles

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


class _Patch:
    """The ``setattr`` of pytest's ``monkeypatch``, for the parity tests' reference set-ups (the
    patches live as long as this process)."""

    def setattr(self, target, name, value, raising: bool = True) -> None:
        setattr(target, name, value)


def build_hpsv2(root: Path):
    from hpsv2 import img_score

    from rtdmd.rewards import hps
    from tests.parity.test_parity_hps import official_model, save_random_checkpoint

    model, preprocess_val = official_model("ViT-H-14", root, None)
    checkpoint = save_random_checkpoint(model, root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    img_score.device = str(device)
    img_score.model_dict = {"model": model.to(device), "preprocess_val": preprocess_val}

    def reference_loop(pictures, prompts):
        """``img_score.score(images, prompt)`` once per distinct prompt: it loads the checkpoint
        once per call, then goes image by image."""
        out = torch.zeros(len(pictures))
        for prompt in dict.fromkeys(prompts):
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            out[rows] = torch.tensor(img_score.score([pictures[i] for i in rows], prompt, cp=str(checkpoint))).float()
        return out

    return (lambda dtype: hps.HpsV2(root, dtype=dtype)), reference_loop


def build_imagereward(root: Path):
    import importlib.util
    import sys
    import types

    from rtdmd.rewards import imagereward
    from tests.parity.test_parity_imagereward import build

    if importlib.util.find_spec("datasets") is None:  # ImageReward's ReFL (training) imports it; scoring never does
        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)

    reference, _ = build(root, _Patch(), tiny=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = reference.to(device)
    reference.device = device

    def reference_loop(pictures, prompts):
        with torch.no_grad():
            return torch.tensor([reference.score(p, im) for im, p in zip(pictures, prompts, strict=True)])

    return (lambda dtype: imagereward.ImageReward(root, dtype=dtype)), reference_loop


BUILDERS = {
    "clipscore": build_clipscore,
    "aesthetic": build_aesthetic,
    "pickscore": build_pickscore,
    "hpsv2": build_hpsv2,
    "imagereward": build_imagereward,
}


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def per_image_ours(reward, images: torch.Tensor, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Our reference path (PIL preprocessing), one image per forward."""
    return torch.cat(
        [reward.reference(images[i : i + 1].cpu(), prompts[i : i + 1], device).cpu() for i in range(len(prompts))]
    )


def measure(name: str, built, images: torch.Tensor, prompts: list[str], args, device: torch.device) -> dict:
    make, reference_loop = built if isinstance(built, tuple) else (built, None)
    row: dict = {"metric": name, "per_image_loop": "reference package" if reference_loop else "ours, reference path"}
    scores = {}
    for dtype in ("float32", "bfloat16"):
        reward = make(dtype)
        score(reward, images[: args.batch_size], prompts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        scores[dtype], seconds = timed(lambda r=reward: score(r, images, prompts, batch_size=args.batch_size), device)
        row[f"ours_{dtype}_images_per_s"] = len(prompts) / seconds
        if dtype == "float32":
            # one prompt for the whole loop: hpsv2's score takes one prompt per call (and loads its
            # checkpoint once per call), as its benchmark does per image folder
            n, loop_prompts = args.per_image, [prompts[0]] * args.per_image
            if reference_loop is None:
                reward.reference(images[:1].cpu(), loop_prompts[:1], device)  # warm-up
                loop = partial(per_image_ours, reward, images[:n], loop_prompts, device)
            else:
                pictures = to_pil(images[:n])
                reference_loop(pictures[:1], loop_prompts[:1])  # warm-up
                loop = partial(reference_loop, pictures, loop_prompts)
            reference, seconds = timed(loop, device)
            ours_same = score(reward, images[:n], loop_prompts, batch_size=args.batch_size)
            row["per_image_float32_images_per_s"] = n / seconds
            row["tensor_vs_reference_max_abs"] = float((ours_same - reference.float().cpu()).abs().max())
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
            try:
                rows.append(measure(name, BUILDERS[name](Path(root)), images, prompts, args, device))
            except Exception as error:  # e.g. a reference package missing: record it, measure the rest
                traceback.print_exc()
                rows.append({"metric": name, "skipped": f"{type(error).__name__}: {error}"})
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
        if "skipped" in r:
            print(f"{r['metric']:<10} skipped: {r['skipped']}")
            continue
        print(
            f"{r['metric']:<10} {r['ours_float32_images_per_s']:>10.1f} {r['ours_bfloat16_images_per_s']:>10.1f} "
            f"{r['per_image_float32_images_per_s']:>10.1f} {r['bf16_drift_max_abs']:>15.2e} {r['tensor_vs_reference_max_abs']:>11.2e}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
