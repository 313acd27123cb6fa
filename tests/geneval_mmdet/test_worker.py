"""GenEval's detector worker in its own environment (``tox -e geneval-mmdet``: torch 2.1.2, mmcv 2.1.0
with compiled ops, mmdet 3.3.0), on Mask2Former Swin-S with random weights (no download): the
worker's detections must equal a direct ``inference_detector`` call on the same files and weights.

Skipped where mmdet is not installed (the default environment)."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest

pytest.importorskip("mmdet")
pytestmark = pytest.mark.geneval_mmdet

import torch  # noqa: E402
from mmdet.apis import inference_detector, init_detector  # noqa: E402

from rtdmd.geneval.client import DetectorClient, DetectorError, worker_command  # noqa: E402
from rtdmd.geneval.worker import CHECKPOINT_URL, CONFIG_NAME, config_path  # noqa: E402

SEED = 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random Swin-S Mask2Former weights (seeded build of the config) saved as an mmengine checkpoint."""
    torch.manual_seed(SEED)
    model = init_detector(config_path(CONFIG_NAME), None, device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "random_mask2former.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": model.dataset_meta}}, path)
    return path


def direct(model, source):
    """``inference_detector`` on a path or an array; an array call gets a copy of the config, which
    mmdet 3.3 would otherwise edit for good (its ``cfg.copy()`` is shallow)."""
    saved = model.cfg
    model.cfg = copy.deepcopy(saved)
    try:
        pred = inference_detector(model, source).pred_instances
    finally:
        model.cfg = saved
    return {
        "boxes": pred.bboxes.numpy(),
        "scores": pred.scores.numpy(),
        "labels": pred.labels.numpy(),
        "masks": pred.masks.numpy().astype(bool),
    }


def assert_same(found, reference) -> tuple[float, float]:
    """Exact labels and masks; returns the max abs difference of boxes and scores."""
    np.testing.assert_array_equal(found.labels, reference["labels"])
    np.testing.assert_array_equal(found.masks, reference["masks"])
    box_diff = float(np.abs(found.boxes - reference["boxes"]).max())
    score_diff = float(np.abs(found.scores - reference["scores"]).max())
    assert box_diff <= 1e-4 and score_diff <= 1e-6, (box_diff, score_diff)
    return box_diff, score_diff


def test_worker_matches_inference_detector(checkpoint, images):
    with DetectorClient(worker_command(sys.executable, checkpoint, device="cpu"), batch_size=2) as client:
        ready = client.ready
        found = client.detect([px for px, _ in images])
    assert ready["device"] == "cpu" and ready["versions"]["mmdet"].startswith("3.")
    assert len(ready["classes"]) == 80 and ready["classes"][64] == "mouse"  # mmdet's COCO order
    model = init_detector(config_path(CONFIG_NAME), str(checkpoint), device="cpu")
    diffs = []
    for i, (f, (px, path)) in enumerate(zip(found, images, strict=True)):
        h, w = px.shape[:2]
        # structure: Mask2Former's top 100 (query, class) pairs, masks at the image's size, boxes inside
        assert len(f) == 100 and f.masks.shape == (100, h, w) and f.boxes.shape == (100, 4)
        assert f.labels.min() >= 0 and f.labels.max() < 80 and ((f.scores >= 0) & (f.scores <= 1)).all()
        assert (f.boxes[:, [0, 2]] <= w).all() and (f.boxes[:, [1, 3]] <= h).all()
        diffs.append(assert_same(f, direct(model, path)))
        if i == 0:  # the file is read as BGR; an RGB array (the RL repositories' call) is another input
            np.testing.assert_array_equal(direct(model, np.ascontiguousarray(px[..., ::-1]))["scores"], f.scores)
            assert not np.array_equal(direct(model, np.ascontiguousarray(px))["scores"], f.scores)
    print(
        f"max |worker - inference_detector|: boxes {max(d[0] for d in diffs):.3g}, scores {max(d[1] for d in diffs):.3g}"
    )


def test_random_weights_flag_is_a_seeded_build_of_the_config(images):
    px, path = images[0]
    command = worker_command(sys.executable, None, device="cpu", random_weights_for_tests=SEED)
    with DetectorClient(command, min_score=0.0) as client:
        (found,) = client.detect([px])
    torch.manual_seed(SEED)
    reference = direct(init_detector(config_path(CONFIG_NAME), None, device="cpu"), path)
    keep = reference["scores"] > 0.0
    assert_same(found, {key: value[keep] for key, value in reference.items()})


def test_worker_without_a_checkpoint_names_the_file_and_url():
    with pytest.raises(DetectorError, match=f"(?s)stopped before answering.*{CHECKPOINT_URL}"):
        DetectorClient(worker_command(sys.executable, None, device="cpu"))
