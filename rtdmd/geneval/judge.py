"""GenEval judging: the official decision rules on a list of detections (metrics.md §8.3-8.7).

Pure and detector-agnostic (numpy only): the real Mask2Former detector and the toy world's exact
detector both produce :class:`Detection` lists and call :func:`judge`. ``judge`` applies the official per-class
filtering itself:

* per class, detections sorted by score (descending, numpy's default argsort as the official code),
  kept if ``score > 0.3`` (``> 0.9`` for every class when the tag is ``counting``), at most 16, no NMS;
* each ``include`` clause takes the class's top-``count`` detections; fewer than ``count`` fails;
  a ``color`` needs all of them to be that colour; a ``position = [relation, group]`` needs every
  found object to stand in ``relation`` to every object of that earlier clause (which must have
  matched); each ``exclude`` clause fails when the class has ``>= count`` detections.

``strict_correct`` and ``partial`` are the variants the RL repositories (Flow-GRPO, DiffusionNFT,
RTDMD) compute beside the official one: ``strict`` needs exactly ``count`` detections per clause
and ignores ``exclude``; ``partial`` averages per-clause credit terms, including their quirk of an
extra 1.0 after any position check whose target matched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# evaluation/object_names.txt of djghosh13/geneval: the 80 COCO classes in mmdet's label order,
# three of them renamed (mouse, remote, keyboard); the prompts' metadata uses these names
CLASSNAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
CROP_BACKGROUND = (153, 153, 153)  # "#999", behind the object's mask before colour classification

ColorClassifier = Callable[[list, str], list[str]]  # (PIL crops, class name) -> colour names


@dataclass(frozen=True)
class Detection:
    """One detected object. ``box = (x1, y1, x2, y2)`` in pixels (x2, y2 exclusive, as mask boxes);
    ``mask`` a boolean ``[H, W]`` array or None; ``color`` the predicted colour when the detector
    knows it (the toy detector does), else None and the colour classifier decides."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: Any = None
    color: str | None = None


@dataclass(frozen=True)
class Verdict:
    correct: bool  # the official GenEval rule
    strict_correct: bool
    partial: float
    reason: str = ""
    detected: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)

    def value(self, variant: str) -> float:
        """The per-image score of a reward variant: ``official`` (``correct``), ``strict``
        (``strict_correct``) or ``partial`` (the partial credit)."""
        return float({"official": self.correct, "strict": self.strict_correct, "partial": self.partial}[variant])


def filter_detections(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    """Official per-class filtering: score order, ``> threshold``, at most 16; classes with none absent."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    out = {}
    for label, dets in by_class.items():
        scores = np.array([d.score for d in dets], dtype=np.float64)
        order = np.argsort(scores)[::-1]
        kept = [dets[i] for i in order if scores[i] > threshold][:MAX_OBJECTS]
        if kept:
            out[label] = kept
    return out


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` to ``b`` from box centres, with each offset shrunk by 0.1 x (sum of sizes)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def crop_for_color(image, det: Detection):
    """The object composited over flat grey through its mask, cropped to its box (PIL rounds the box)."""
    from PIL import Image

    image = image.convert("RGB")
    if det.mask is not None:
        image = Image.composite(
            image, Image.new("RGB", image.size, CROP_BACKGROUND), Image.fromarray(np.asarray(det.mask, dtype=bool))
        )
    return image.crop(tuple(det.box))


def colors_of(found: list[Detection], classname: str, image, color_classifier: ColorClassifier | None) -> list[str]:
    if all(d.color is not None for d in found):
        return [d.color for d in found]
    if image is None or color_classifier is None:
        raise ValueError(f"detections of {classname!r} carry no colour: pass the image and a colour classifier")
    return list(color_classifier([crop_for_color(image, d) for d in found], classname))


def _position_failure(found: list[Detection], targets: list[Detection], relation: str, classname: str) -> str | None:
    for obj in found:
        for target in targets:
            rels = relative_position(obj, target)
            if relation not in rels:
                # the official text joins a set (order varies with PYTHONHASHSEED); sorted here
                return f"expected {classname} {relation} target, found {' and '.join(sorted(rels))} target"
    return None


def _official(
    detected: dict[str, list[Detection]], metadata: dict, colors: Callable[[list[Detection], str], list[str]]
) -> tuple[bool, list[str]]:
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = detected.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in req:
            got = colors(found, cls)
            if got.count(req["color"]) < count:
                matched = False
                reasons.append(
                    f"expected {req['color']} {cls}>={count}, found {got.count(req['color'])} {req['color']}; and "
                    + ", ".join(f"{got.count(c)} {c}" for c in COLORS if c in got)
                )
        if matched and "position" in req:
            relation, group = req["position"]
            if groups[group] is None:
                matched = False
                reasons.append(f"no target for {cls} to be {relation}")
            elif (failure := _position_failure(found, groups[group], relation, cls)) is not None:
                matched = False
                reasons.append(failure)
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, reasons


def _strict_and_partial(
    detected: dict[str, list[Detection]], metadata: dict, colors: Callable[[list[Detection], str], list[str]]
) -> tuple[bool, float]:
    correct, credits, groups = True, [], []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = detected.get(cls, [])
        credits.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in req or "position" in req:
                credits.append(0.0)
        else:
            if "color" in req:
                n_color = colors(found, cls).count(req["color"])
                credits.append(1 - abs(count - n_color) / count)
                matched = n_color == count
            if matched and "position" in req:
                relation, group = req["position"]
                if groups[group] is None:
                    matched = False
                    credits.append(0.0)
                else:
                    if _position_failure(found, groups[group], relation, cls) is not None:
                        matched = False
                        credits.append(0.0)
                    credits.append(1.0)  # the reference implementations append this in every case
        correct &= matched
        groups.append(found if matched else None)
    return correct, (sum(credits) / len(credits) if credits else 0.0)


def judge(
    metadata: dict, detections: Sequence[Detection], image=None, color_classifier: ColorClassifier | None = None
) -> Verdict:
    """Judge one image's detections against its GenEval metadata (``tag``, ``include``, ``exclude``)."""
    detected = filter_detections(detections, metadata["tag"])
    cache: dict[tuple[int, ...], list[str]] = {}

    def colors(found: list[Detection], cls: str) -> list[str]:
        key = tuple(id(d) for d in found)
        if key not in cache:
            cache[key] = colors_of(found, cls, image, color_classifier)
        return cache[key]

    correct, reasons = _official(detected, metadata, colors)
    strict, partial = _strict_and_partial(detected, metadata, colors)
    boxes = {label: [tuple(map(float, d.box)) for d in dets] for label, dets in detected.items()}
    return Verdict(correct=correct, strict_correct=strict, partial=partial, reason="\n".join(reasons), detected=boxes)


def summarize(rows: Sequence[dict]) -> tuple[dict, str]:
    """Official ``summary_scores.py`` aggregation of per-image rows (``tag``, ``correct``, ``metadata``
    as a JSON string, optionally ``strict_correct`` and ``partial``): the overall GenEval score is the
    unweighted mean of the task accuracies. Returns a dict and the official text."""
    tags: dict[str, list[bool]] = {}
    for row in rows:
        tags.setdefault(row["tag"], []).append(bool(row["correct"]))
    prompts: dict[str, bool] = {}
    for row in rows:
        prompts[row["metadata"]] = prompts.get(row["metadata"], False) or bool(row["correct"])
    per_task = {tag: float(np.mean(v)) for tag, v in tags.items()}
    overall = float(np.mean(list(per_task.values()))) if per_task else 0.0
    result = {
        "images": len(rows),
        "prompts": len(prompts),
        "image_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else 0.0,
        "prompt_accuracy": float(np.mean(list(prompts.values()))) if prompts else 0.0,
        "per_task": per_task,
        "overall": overall,
    }
    for variant in ("strict_correct", "partial"):
        if rows and all(variant in r for r in rows):
            by_tag: dict[str, list[float]] = {}
            for r in rows:
                by_tag.setdefault(r["tag"], []).append(float(r[variant]))
            result[f"{variant}_overall"] = float(np.mean([np.mean(v) for v in by_tag.values()]))
    lines = [
        "Summary",
        "=======",
        f"Total images: {result['images']}",
        f"Total prompts: {result['prompts']}",
        f"% correct images: {result['image_accuracy']:.2%}",
        f"% correct prompts: {result['prompt_accuracy']:.2%}",
        "",
        "Task breakdown",
        "==============",
        *(f"{tag:<16} = {per_task[tag]:.2%} ({sum(v)} / {len(v)})" for tag, v in tags.items()),
        "",
        f"Overall score (avg. over tasks): {overall:.5f}",
    ]
    return result, "\n".join(lines) + "\n"
