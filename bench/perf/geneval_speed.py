"""GenEval scoring throughput (images/s) with the ported detector, at GenEval's protocol: 512 px images
(rescaled to 800 x 800 for the detector), the 553 GenEval prompts' metadata, detection + colour
classification + the judge, exactly :class:`rtdmd.rewards.geneval_real.GenEvalScorer`.

    python bench/perf/geneval_speed.py --device cuda --images 256 --out results.json

Rows, each on the same images: the port one image per call (what the mmdet worker and the RL reward
servers do: one ``inference_detector`` per image), the port batched (``--batches``), and batched with
the colour crops of all images classified together (``batch_colours``). ``--worker PYTHON`` adds the
mmdet worker (its per-image loop, its own seeded random weights) where its environment exists (this
project's CPU; mmcv's ops do not build for the GPU machine's torch).

Random weights at the released sizes (Mask2Former Swin-S, CLIP ViT-L/14 QuickGELU): speed does not
depend on the values, but the work does: random class logits put every score near 1/81, so nothing
would pass GenEval's 0.3 threshold and no colour crop would be classified. The class head is scaled
(``--class-scale``) so each query has one confident class, as a trained detector's do; the JSON
records how many detections and colour crops each row had.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rtdmd.geneval.m2f.detector import PortDetector  # noqa: E402
from rtdmd.geneval.m2f.model import Mask2Former  # noqa: E402
from rtdmd.rewards.geneval_real import MIN_SCORE, GenEvalScorer  # noqa: E402

PROMPTS = Path(__file__).resolve().parents[2] / "prompts" / "geneval" / "data" / "test.jsonl"


def geneval_metadata(n: int) -> list[dict]:
    """``n`` prompts' metadata in a seeded shuffle of the 553 (the file is sorted by category, and the
    colour prompts come after the first 259)."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    order = np.random.default_rng(0).permutation(len(rows))
    return [json.loads(rows[order[i % len(rows)]]["metadata"]) for i in range(n)]


def images_like_samples(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random images with a few flat blobs (uint8 RGB), cheap to make, not noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    out = np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)
    for img in out:
        for _ in range(3):
            y, x, h, w = rng.integers(0, size // 2, 4)
            img[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return out


class CountingColours:
    """The colour classifier, counting the crops it classifies."""

    def __init__(self, inner) -> None:
        self.inner, self.crops = inner, 0

    def __call__(self, crops, classname):
        self.crops += len(crops)
        return self.inner(crops, classname)

    def classify_many(self, requests):
        self.crops += sum(len(c) for c, _ in requests)
        return self.inner.classify_many(requests)


def build(device: torch.device, tiny: bool, class_scale: float):
    import open_clip

    from rtdmd.geneval.colour import ClipColorClassifier

    torch.manual_seed(0)
    model = Mask2Former()
    with torch.no_grad():
        model.panoptic_head.cls_embed.weight.mul_(class_scale)
    arch = "ViT-L-14-quickgelu"
    if tiny:
        clip = open_clip.CLIP(
            embed_dim=32,
            vision_cfg={"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            quick_gelu=True,
        )
    else:
        clip = open_clip.create_model(arch)
    colour = ClipColorClassifier(clip, open_clip.get_tokenizer(arch), device=device)
    return model, colour


def time_scorer(scorer: GenEvalScorer, colours: CountingColours, pixels: np.ndarray, meta: list[dict], chunk: int):
    """Seconds to score ``pixels`` in calls of ``chunk`` images (the scorer's cache cleared first)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    scorer.forget()
    colours.crops = 0
    sync()
    t = time.perf_counter()
    verdicts = []
    for start in range(0, len(pixels), chunk):
        verdicts += scorer.evaluate(pixels[start : start + chunk], meta[start : start + chunk])
    sync()
    return time.perf_counter() - t, verdicts


def profile(model, colours, device: torch.device, pixels: np.ndarray, meta: list[dict], batch: int) -> dict:
    """Milliseconds per image of each phase of one ``batch`` (pre-processing, network, post-processing, the
    copy to the host, detections to objects, judge with colours), then the network's CUDA kernels by
    total time (torch.profiler)."""
    from PIL import Image

    from rtdmd.geneval.m2f.detector import tf32_off
    from rtdmd.geneval.m2f.pipeline import postprocess_batch, preprocess_batch
    from rtdmd.rewards.geneval_real import to_detections

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    detector = PortDetector(model, device, batch_size=batch, min_score=MIN_SCORE)
    scorer = GenEvalScorer(detector, colours)
    pixels, meta = pixels[:batch], meta[:batch]
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str):
        sync()
        t = time.perf_counter()
        yield
        sync()
        phases[name] = time.perf_counter() - t

    for _ in range(2):  # the second pass is the one kept (the first warms up)
        with torch.no_grad(), tf32_off():
            with phase("preprocess"):
                batch_tensor, resized = preprocess_batch(torch.from_numpy(pixels).to(device))
            with phase("network"):
                classes, masks = detector.model(batch_tensor)
            with phase("postprocess"):
                found = postprocess_batch(
                    classes, masks, tuple(batch_tensor.shape[2:]), resized, pixels.shape[1:3], MIN_SCORE
                )
            with phase("to host"):
                found = [detector.to_host(f) for f in found]
        with phase("to_detections"):
            dets = [to_detections(f) for f in found]
        images = [Image.fromarray(p, "RGB") for p in pixels]
        with phase("judge + colours"):
            scorer._judge_all(meta, dets, images)
    table = {name: round(seconds / batch * 1000, 3) for name, seconds in phases.items()}
    kernels = []
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch.no_grad(), tf32_off(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            detector.model(batch_tensor)
            sync()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in rows)
        for e in sorted(rows, key=lambda e: -e.device_time_total)[:25]:
            ms = e.device_time_total / 1000
            kernels.append({"kernel": e.key[:110], "ms": round(ms, 2), "share": round(e.device_time_total / total, 3)})
        table["kernels_total_ms_per_image"] = round(total / 1000 / batch, 3)
    Console().print({"ms_per_image": table})
    for k in kernels:
        Console().print(f"{k['share']:6.1%} {k['ms']:9.2f} ms  {k['kernel']}")
    return {"batch": batch, "ms_per_image": table, "kernels": kernels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=256, help="images per row")
    parser.add_argument("--resolution", type=int, default=512, help="generated image size (GenEval: 512)")
    parser.add_argument("--batches", default="16,32", help="detector batch sizes of the batched rows")
    parser.add_argument("--class-scale", type=float, default=20.0, help="scale of the random class head")
    parser.add_argument("--worker", default="", help="the mmdet worker environment's python: add its row")
    parser.add_argument("--tiny", action="store_true", help="tiny colour CLIP: a CPU smoke test of this script")
    parser.add_argument("--profile", action="store_true", help="only: phase times and CUDA kernels of one batch")
    parser.add_argument("--out", default="geneval_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, clip_colours = build(device, args.tiny, args.class_scale)
    pixels = images_like_samples(args.images, args.resolution)
    meta = geneval_metadata(args.images)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {p: metadata.version(p) for p in ("torch", "open_clip_torch", "numpy")},
        "images": args.images,
        "resolution": args.resolution,
        "rows": [],
    }
    if args.profile:
        batch = int(args.batches.split(",")[-1])
        record["profile"] = profile(model, CountingColours(clip_colours), device, pixels, meta, batch)
        Path(args.out).write_text(json.dumps(record, indent=2))
        return
    batches = [int(b) for b in args.batches.split(",")]
    rows = [("port, one image per call", 1, False)]
    rows += [(f"port, batch {b}", b, False) for b in batches]
    rows += [(f"port, batch {batches[-1]}, colours batched", batches[-1], True)]
    reference = None
    for name, detector_batch, batch_colours in rows:
        chunk = detector_batch
        colours = CountingColours(clip_colours)
        detector = PortDetector(model, device, batch_size=detector_batch, min_score=MIN_SCORE)
        scorer = GenEvalScorer(detector, colours, batch_colours=batch_colours)
        time_scorer(scorer, colours, pixels[:chunk], meta[:chunk], chunk)  # warm-up: kernels, colour heads
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, verdicts = time_scorer(scorer, colours, pixels, meta, chunk)
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        values = [(v.correct, v.partial) for v, _ in verdicts]
        reference = reference or values
        row = {
            "name": name,
            "detector_batch": detector_batch,
            "batch_colours": batch_colours,
            "seconds": seconds,
            "images_per_s": args.images / seconds,
            "peak_memory_gib": peak_gib,
            "colour_crops": colours.crops,
            "detections_above_0.3": sum(len(rows) for _, details in verdicts for rows in details.values()),
            "correct": sum(c for c, _ in values),
            "same_verdicts_as_first_row": values == reference,
        }
        record["rows"].append(row)
        Console().print(row)
        Path(args.out).write_text(json.dumps(record, indent=2))
    if args.worker:
        from rtdmd.geneval.client import DetectorClient, worker_command

        colours = CountingColours(clip_colours)
        command = worker_command(args.worker, None, device="cpu", random_weights_for_tests=0)
        with DetectorClient(command, batch_size=1, min_score=MIN_SCORE) as client:
            scorer = GenEvalScorer(client, colours)
            n = min(args.images, 16)
            time_scorer(scorer, colours, pixels[:1], meta[:1], 1)
            seconds, _ = time_scorer(scorer, colours, pixels[:n], meta[:n], 1)
        row = {"name": "mmdet worker, one image per call", "images": n, "seconds": seconds, "images_per_s": n / seconds}
        record["rows"].append(row)
        Console().print(row)
    table = Table(title=f"GenEval scoring · {args.resolution} px · {record['device']}")
    for col in ("row", "images/s", "peak GiB", "colour crops", "detections > 0.3", "same verdicts"):
        table.add_column(col, justify="right")
    for r in record["rows"]:
        table.add_row(
            r["name"],
            f"{r['images_per_s']:.2f}",
            "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}",
            str(r.get("colour_crops", "")),
            str(r.get("detections_above_0.3", "")),
            str(r.get("same_verdicts_as_first_row", "")),
        )
    Console().print(table)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
