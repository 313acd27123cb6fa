"""GenEval-format prompts from GenEval's published generation procedure (its ``prompts/create_prompts.py``).

Six tasks over the 80 COCO class names in the detector's label order, with GenEval's templates
(``a``/``an`` by the first letter, plurals with ``es`` after an ``s``), counts 2-4 in words with an
``exclude`` of one more, ten colours (never on ``person``), four relations. The draws follow the
procedure's order of numpy calls, so :func:`evaluation_metadata` (seed 43, 100 draws per task)
reproduces the official ``evaluation_metadata.jsonl`` byte for byte (553 prompts after removing
repeats; the test checks its sha256).

:func:`training_metadata` draws the same tasks with another seed and drops every prompt of the
evaluation set: GenEval-style training prompts for stage 2 when Flow-GRPO's ``train_metadata.jsonl``
is not at hand. Every single-object prompt is an evaluation prompt (one per class), so the training
set has none. It is served as the prompt source ``generated:geneval-train`` (:mod:`rtdmd.data`).
"""

from __future__ import annotations

import json

import numpy as np

from rtdmd.data import GENERATED_PROMPTS
from rtdmd.geneval.judge import CLASSNAMES

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EVALUATION_SEED, EVALUATION_DRAWS = 43, 100
TRAINING_SEED, TRAINING_DRAWS = 0, 2000


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
    return f"{word}es" if word.endswith("s") else f"{word}s"


def _uncoloured(index: int) -> int:
    """Class index ``(index + 1 + person) mod 80`` for ``index`` in ``0..78``: every class but person."""
    return (index + 1 + CLASSNAMES.index("person")) % len(CLASSNAMES)


def single_objects(rng: np.random.Generator) -> list[dict]:
    """Every class once, in a drawn order."""
    return [
        {
            "tag": "single_object",
            "include": [{"class": CLASSNAMES[i], "count": 1}],
            "prompt": f"a photo of {article(CLASSNAMES[i])}",
        }
        for i in rng.choice(len(CLASSNAMES), size=len(CLASSNAMES), replace=False)
    ]


def two_object(rng: np.random.Generator) -> dict:
    a, b = (CLASSNAMES[i] for i in rng.choice(len(CLASSNAMES), size=2, replace=False))
    include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    return {"tag": "two_object", "include": include, "prompt": f"a photo of {article(a)} and {article(b)}"}


def counting(rng: np.random.Generator) -> dict:
    name = CLASSNAMES[rng.choice(len(CLASSNAMES))]
    count = int(rng.integers(2, 4, endpoint=True))
    return {
        "tag": "counting",
        "include": [{"class": name, "count": count}],
        "exclude": [{"class": name, "count": count + 1}],
        "prompt": f"a photo of {NUMBERS[count]} {plural(name)}",
    }


def colors(rng: np.random.Generator) -> dict:
    name = CLASSNAMES[_uncoloured(int(rng.choice(len(CLASSNAMES) - 1)))]
    colour = COLOURS[rng.choice(len(COLOURS))]
    include = [{"class": name, "count": 1, "color": colour}]
    return {"tag": "colors", "include": include, "prompt": f"a photo of {article(colour)} {name}"}


def position(rng: np.random.Generator) -> dict:
    """``a`` is placed relative to ``b``, which is listed first (GenEval's metadata order)."""
    a, b = (CLASSNAMES[i] for i in rng.choice(len(CLASSNAMES), size=2, replace=False))
    relation = RELATIONS[rng.choice(len(RELATIONS))]
    include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]
    return {"tag": "position", "include": include, "prompt": f"a photo of {article(a)} {relation} {article(b)}"}


def color_attr(rng: np.random.Generator) -> dict:
    a, b = (CLASSNAMES[_uncoloured(int(i))] for i in rng.choice(len(CLASSNAMES) - 1, size=2, replace=False))
    colour_a, colour_b = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    include = [{"class": a, "count": 1, "color": colour_a}, {"class": b, "count": 1, "color": colour_b}]
    prompt = f"a photo of {article(colour_a)} {a} and {article(colour_b)} {b}"
    return {"tag": "color_attr", "include": include, "prompt": prompt}


def draw_suite(seed: int, draws_per_task: int) -> list[dict]:
    """All single objects, then ``draws_per_task`` draws of each other task in GenEval's order, repeats
    removed (first kept)."""
    rng = np.random.default_rng(seed)
    rows = single_objects(rng)
    for make in (two_object, counting, colors, position, color_attr):
        rows += [make(rng) for _ in range(draws_per_task)]
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def to_jsonl(rows: list[dict]) -> bytes:
    """GenEval's file format: one ``json.dumps`` object per line, keys in the order written."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def evaluation_metadata() -> list[dict]:
    """The official GenEval evaluation metadata (553 prompts)."""
    return draw_suite(EVALUATION_SEED, EVALUATION_DRAWS)


def training_metadata(seed: int = TRAINING_SEED, draws_per_task: int = TRAINING_DRAWS) -> list[dict]:
    """GenEval-format training prompts: :func:`draw_suite` with ``seed``, each prompt at most once,
    none of them an evaluation prompt."""
    if seed == EVALUATION_SEED:
        raise ValueError(f"seed {seed} is the evaluation suite's")
    held_out = {row["prompt"] for row in evaluation_metadata()}
    seen: set[str] = set()
    rows = []
    for row in draw_suite(seed, draws_per_task):
        if row["prompt"] not in held_out and row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


@GENERATED_PROMPTS.register("geneval-train.jsonl")
def geneval_train_jsonl() -> bytes:
    """``generated:geneval-train.jsonl``: the training prompts as a prompt file's bytes."""
    return to_jsonl(training_metadata())
