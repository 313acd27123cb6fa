"""GenEval's detector as a worker process: Mask2Former Swin-S through mmdetection 3.x.

Runs INSIDE the isolated ``tox -e geneval-mmdet`` environment (torch 2.1.2, mmcv 2.1.0 with compiled
ops, mmdet 3.3.0), started by :mod:`rtdmd.geneval.client` as ``python worker.py ...``. It imports only
the standard library, numpy, OpenCV and OpenMMLab packages, never ``rtdmd``.

Protocol (JSON lines; stdout carries protocol lines only, everything libraries print goes to stderr):

* on start, after the model is built: ``{"event": "ready", "classes": [...], "device": ..., "cuda_ops": ...,
  "versions": {...}}``;
* request ``{"id": k, "images": [png paths], "out": npz path, "min_score": s or null}``: each image goes
  through ``inference_detector(model, path)``, one at a time as the official ``evaluate_images.py``;
  the model reads the file with OpenCV (BGR), like the official script;
* reply ``{"id": k, "ok": true, "counts": [N_i, ...]}`` with the npz holding, per image ``i``:
  ``boxes_i`` float32 ``[N, 4]`` (x1, y1, x2, y2 pixels; the tight box of the mask, x2/y2 exclusive),
  ``scores_i`` float32 ``[N]``, ``labels_i`` int64 ``[N]`` (COCO index in mmdet order),
  ``masks_i`` uint8 ``np.packbits`` of the bool ``[N, H, W]`` masks (flattened), ``shape_i`` = ``[N, H, W]``;
  detections in the order mmdet returns them (the per-class order the official script sorts);
  ``min_score`` keeps only ``score > min_score`` (GenEval never uses a detection at or below 0.3);
* a failure replies ``{"id": k, "ok": false, "error": traceback}`` and the worker keeps serving;
* ``{"cmd": "quit"}`` or end of input stops it (exit code 0).

Weights: ``--checkpoint`` (the real path), or ``--random-weights-for-tests SEED`` (the config built
with ``torch.manual_seed(SEED)`` and no checkpoint: for tests of the plumbing only, never a score).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

CONFIG_NAME = "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco"
CHECKPOINT_URL = (
    "https://download.openmmlab.com/mmdetection/v3.0/mask2former/"
    f"{CONFIG_NAME}/{CONFIG_NAME}_20220504_001756-c9d0c4f2.pth"
)
CUDA_OPS_TOLERANCE = 1e-3  # max |CUDA op - PyTorch reference| of the deformable-attention sanity check


def config_path(config: str) -> str:
    """A config file path, or a config name looked up in the configs mmdet's wheel ships (``.mim``)."""
    if os.path.isfile(config):
        return config
    import mmdet

    name = config if config.endswith(".py") else f"{config}.py"
    folder = name.split("_", 1)[0]
    shipped = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", folder, name)
    if not os.path.isfile(shipped):
        raise FileNotFoundError(f"no mmdet config {config!r}: neither a file nor {shipped}")
    return shipped


def has_cuda_ops() -> bool:
    """Whether mmcv's compiled ops include CUDA kernels (else mmcv reports ``"not available"``)."""
    from mmcv.ops import get_compiling_cuda_version

    return get_compiling_cuda_version() != "not available"


def pick_device(device: str) -> str:
    """``auto`` (or ``auto:N``): GPU 0 (or N) when torch sees one and mmcv was compiled with CUDA ops,
    else the CPU; any other value is used as given."""
    import torch

    if not device.startswith("auto"):
        return device
    index = device.partition(":")[2] or "0"
    return f"cuda:{index}" if torch.cuda.is_available() and has_cuda_ops() else "cpu"


def check_cuda_ops(device: str) -> float:
    """Max abs difference of mmcv's CUDA multi-scale deformable attention and its PyTorch reference on
    random inputs. A build for another GPU architecture has been seen to "work" with wrong numbers
    (metrics.md §8.8), so a GPU worker refuses to start when they differ."""
    import torch
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction, multi_scale_deformable_attn_pytorch

    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[8, 8], [4, 4]], dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    n_value, heads, channels, queries, levels, points = int((shapes[:, 0] * shapes[:, 1]).sum()), 2, 8, 5, 2, 4
    value = torch.rand(1, n_value, heads, channels, generator=gen)
    locations = torch.rand(1, queries, heads, levels, points, 2, generator=gen)
    weights = torch.rand(1, queries, heads, levels, points, generator=gen)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    reference = multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    on = [t.to(device) for t in (value, shapes, starts, locations, weights)]
    compiled = MultiScaleDeformableAttnFunction.apply(*on, 64).cpu()
    return float((compiled - reference).abs().max())


def build_model(config: str, checkpoint: str | None, random_seed: int | None, device: str):
    """``init_detector`` on the named config with ``checkpoint``, or with random weights (seeded) for tests."""
    if checkpoint is None and random_seed is None:
        raise ValueError(
            f"no --checkpoint given: the detector needs {CHECKPOINT_URL.rsplit('/', 1)[-1]} ({CHECKPOINT_URL}); "
            "random weights only with --random-weights-for-tests"
        )
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; download it from {CHECKPOINT_URL}")
    import torch
    from mmdet.apis import init_detector

    if checkpoint is None:
        torch.manual_seed(random_seed)
    return init_detector(config_path(config), checkpoint, device=device)


def encode(boxes, scores, labels, masks, min_score: float | None) -> dict:
    """One image's detections as the npz arrays of the protocol, keeping ``score > min_score`` (all if None)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float32)
    keep = np.ones(len(scores), dtype=bool) if min_score is None else scores > min_score
    masks = np.asarray(masks, dtype=bool)[keep]
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep],
        "scores": scores[keep],
        "labels": np.asarray(labels, dtype=np.int64)[keep],
        "masks": np.packbits(masks.reshape(-1)),
        "shape": np.array(masks.shape, dtype=np.int64),
    }


def detect(model, path: str, min_score: float | None) -> dict:
    """One image file through ``inference_detector`` (mmdet reads it with OpenCV, BGR) -> :func:`encode`."""
    from mmdet.apis import inference_detector

    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    # a path, never an array: besides the channel order, mmdet 3.3's inference_detector edits the
    # model's own test pipeline (a shallow cfg copy) on an array call, so later path calls would break
    pred = inference_detector(model, path).pred_instances
    return encode(
        pred.bboxes.float().cpu().numpy(),
        pred.scores.float().cpu().numpy(),
        pred.labels.cpu().numpy(),
        pred.masks.cpu().numpy(),
        min_score,
    )


def serve(run, requests, reply) -> None:
    """Answer ``requests`` (dicts) until ``quit`` or their end; ``run(path, min_score)`` detects one
    image (:func:`detect` with the model bound), ``reply`` sends one dict."""
    import numpy as np

    for request in requests:
        if request.get("cmd") == "quit":
            return
        try:
            arrays, counts = {}, []
            for i, path in enumerate(request["images"]):
                found = run(path, request.get("min_score"))
                arrays.update({f"{key}_{i}": value for key, value in found.items()})
                counts.append(len(found["scores"]))
            partial = request["out"] + ".part"
            with open(partial, "wb") as handle:  # a half-written npz must never look finished
                np.savez_compressed(handle, **arrays)
            os.replace(partial, request["out"])
            reply({"id": request.get("id"), "ok": True, "counts": counts})
        except Exception:
            reply({"id": request.get("id"), "ok": False, "error": traceback.format_exc()})


def requests_from(stream):
    """JSON requests, one per non-empty line of ``stream``."""
    return (json.loads(line) for line in stream if line.strip())


def versions() -> dict:
    import cv2
    import mmcv
    import mmdet
    import mmengine
    import numpy
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "mmcv": mmcv.__version__,
        "mmdet": mmdet.__version__,
        "mmengine": mmengine.__version__,
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
    }


def protocol_stdout():
    """The real stdout for protocol lines; fd 1 itself then points at stderr, so that whatever the
    libraries print (mmengine's logger, warnings) cannot corrupt the protocol."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return protocol


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG_NAME, help="config file, or a config name shipped with mmdet")
    parser.add_argument("--checkpoint", default=None, help=f"weights file ({CHECKPOINT_URL})")
    parser.add_argument("--random-weights-for-tests", type=int, default=None, metavar="SEED")
    parser.add_argument("--device", default="auto", help="auto, auto:N, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import mmcv  # noqa: F401
        import mmdet  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"{sys.executable} cannot import mmdet/mmcv ({error}): run this worker with the python of the "
            "environment `tox -e geneval-mmdet` builds"
        ) from error
    out = protocol_stdout()

    def reply(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.startswith("cuda"):
        if not has_cuda_ops():
            raise SystemExit(f"device {device}: this mmcv was built without CUDA ops (rebuild with FORCE_CUDA=1)")
        if (error := check_cuda_ops(device)) > CUDA_OPS_TOLERANCE:
            raise SystemExit(f"mmcv's CUDA deformable attention differs from its PyTorch reference by {error:.3g}")
    model = build_model(args.config, args.checkpoint, args.random_weights_for_tests, device)
    classes = list(model.dataset_meta["classes"])
    reply({"event": "ready", "classes": classes, "device": device, "cuda_ops": has_cuda_ops(), "versions": versions()})
    serve(lambda path, min_score: detect(model, path, min_score), requests_from(sys.stdin), reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
