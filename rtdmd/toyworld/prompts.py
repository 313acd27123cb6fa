"""Toy-world prompts in GenEval's six templates and exact metadata format, and scenes that satisfy them.

Templates (GenEval ``prompts/create_prompts.py``): single_object "a photo of a {cls}", two_object
"a photo of a {A} and a {B}", counting "a photo of {two|three|four} {plural}" (include ``count=N``,
exclude ``count=N+1``), colors "a photo of a {color} {cls}", position "a photo of a {A} {relation} a
{B}" (include ``[{B, 1}, {A, 1, position: [relation, 0]}]``), color_attr "a photo of a {c1} {A} and
a {c2} {B}". Articles become "an" before a vowel. Every draw comes from ``seed_for`` coordinates.
"""

from __future__ import annotations

import numpy as np

from rtdmd.geneval.judge import Detection, relative_position
from rtdmd.seeding import seed_for
from rtdmd.toyworld.world import PALETTE, PLURALS, SHAPES, SIZE, SIZE_RANGES, Obj

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
COLORS = tuple(PALETTE)
# GenEval's task mix (553 prompts): 80 / 99 / 80 / 94 / 100 / 100
GENEVAL_MIX = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def sample_metadata(tag: str, rng: np.random.Generator) -> dict:
    """One GenEval-format metadata dict (keys in the official order: tag, include, [exclude], prompt)."""
    pick = lambda options, n=1: [options[i] for i in rng.choice(len(options), size=n, replace=False)]  # noqa: E731
    if tag == "single_object":
        (cls,) = pick(SHAPES)
        return {"tag": tag, "include": [{"class": cls, "count": 1}], "prompt": f"a photo of {article(cls)}"}
    if tag == "two_object":
        a, b = pick(SHAPES, 2)
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {article(a)} and {article(b)}",
        }
    if tag == "counting":
        (cls,), n = pick(SHAPES), int(rng.integers(2, 5))
        return {
            "tag": tag,
            "include": [{"class": cls, "count": n}],
            "exclude": [{"class": cls, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {PLURALS[cls]}",
        }
    if tag == "colors":
        (cls,), (color,) = pick(SHAPES), pick(COLORS)
        return {
            "tag": tag,
            "include": [{"class": cls, "count": 1, "color": color}],
            "prompt": f"a photo of {article(color)} {cls}",
        }
    if tag == "position":
        (a, b), (rel,) = pick(SHAPES, 2), pick(RELATIONS)
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {article(a)} {rel} {article(b)}",
        }
    if tag == "color_attr":
        (a, b), (c1, c2) = pick(SHAPES, 2), pick(COLORS, 2)
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}],
            "prompt": f"a photo of {article(c1)} {a} and {article(c2)} {b}",
        }
    raise ValueError(f"unknown tag {tag!r}")


MIRRORED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def composition(metadata: dict) -> tuple | None:
    """What a compositional prompt asserts, independent of how it is worded: the task and the set of
    (class, colour) objects, with a relation written one way (``A right of B`` is ``B left of A``);
    None for the single-object and counting tasks, whose prompts are vocabulary, not compositions."""
    tag, include = metadata["tag"], metadata["include"]
    if tag in ("single_object", "counting"):
        return None
    objects = [(req["class"], req.get("color", "")) for req in include]
    if tag == "position":
        target, subject = objects
        relation = include[1]["position"][0]
        if relation in ("right of", "below"):  # written with the other object first
            subject, target, relation = target, subject, MIRRORED[relation]
        return (tag, subject, relation, target)
    return (tag, *sorted(objects))


def identity(metadata: dict) -> tuple | str:
    """A prompt's :func:`composition`, or its text where it has none."""
    return composition(metadata) or metadata["prompt"]


def make_prompts(seed: int, counts: dict[str, int], exclude: frozenset = frozenset()) -> list[dict]:
    """Prompts per tag, tags in GenEval's order: no two with the same :func:`identity` (so not both
    "a circle and a ring" and "a ring and a circle"), and none whose identity is in ``exclude``."""
    rows: list[dict] = []
    for tag in TAGS:
        seen: set = set()
        draw = 0
        while len(seen) < counts.get(tag, 0):
            metadata = sample_metadata(tag, np.random.default_rng(seed_for(seed, "prompt", tag, draw)))
            draw += 1
            if (key := identity(metadata)) in seen or key in exclude:
                if draw > 100 * max(counts.values()):
                    raise ValueError(f"cannot draw {counts[tag]} unique {tag} prompts")
                continue
            seen.add(key)
            rows.append(metadata)
    return rows


def _fits(obj: Obj, others: list[Obj], gap: float = 2.0, margin: float = 1.0) -> bool:
    x1, y1, x2, y2 = obj.box
    if x1 < margin or y1 < margin or x2 > SIZE - margin or y2 > SIZE - margin:
        return False
    return all(
        max(abs(obj.cx - o.cx) - (obj.size + o.size) / 2, abs(obj.cy - o.cy) - (obj.size + o.size) / 2) >= gap
        for o in others
    )


def _as_detection(obj: Obj) -> Detection:
    return Detection(obj.shape, obj.box, 1.0)


def scene_for(metadata: dict, seed: int, max_tries: int = 2000) -> list[Obj]:
    """A scene that satisfies ``metadata`` exactly (classes, counts, colours, relations), no extras."""
    rng = np.random.default_rng(seed)
    wanted = [
        (req["class"], req.get("color"), req.get("position"))
        for req in metadata["include"]
        for _ in range(req["count"])
    ]
    low, high = SIZE_RANGES[len(wanted)]
    for _ in range(max_tries):
        objects: list[Obj] = []
        for shape, color, position in wanted:
            size = float(rng.uniform(low, high))
            color = color or COLORS[int(rng.integers(len(COLORS)))]
            for _ in range(50):
                if position is None:
                    cx, cy = rng.uniform(size / 2 + 1, SIZE - size / 2 - 1, size=2)
                else:
                    target = objects[0]  # position clauses refer to group 0, the first object
                    along = (size + target.size) / 2 + float(rng.uniform(3, 10))
                    across = float(rng.uniform(-0.25, 0.25)) * along
                    dx, dy = {
                        "left of": (-along, across),
                        "right of": (along, across),
                        "above": (across, -along),
                        "below": (across, along),
                    }[position[0]]
                    cx, cy = target.cx + dx, target.cy + dy
                obj = Obj(shape, color, float(cx), float(cy), size)
                if _fits(obj, objects) and (
                    position is None or position[0] in relative_position(_as_detection(obj), _as_detection(objects[0]))
                ):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == len(wanted):
            return objects
    raise RuntimeError(f"no scene found for {metadata['prompt']!r}")
