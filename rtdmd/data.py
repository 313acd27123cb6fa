"""Training prompts: a prompt file, read once, sampled by coordinates.

A prompt file is a text file (one prompt per line) or a ``.jsonl`` file (the ``"prompt"`` of each
object, e.g. GenEval's metadata format), given as a path or as ``package:<python.package>/<path>``:
package data read through importlib.resources (``package:rtdmd.toyworld/suites/toy_train.jsonl``),
so a config can name a shipped file wherever the project is installed, or as
``generated:<name>``: the bytes a registered generator writes (:data:`GENERATED_PROMPTS`, e.g.
``generated:geneval-train.jsonl``, GenEval-format training prompts that exclude GenEval's evaluation
prompts), the same on every machine, so a config pins them by sha256 like a file.

The prompt at position ``p`` of the training stream is ``perm_e[p mod N]`` where ``e = p // N`` and
``perm_e`` is a permutation seeded by ``seed_for(seed, "epoch", e)``: every prompt appears once per
epoch, and any step's batch is computed from the step number alone (resume needs no sampler state,
and the same global batch comes out on any number of processes).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from rtdmd.errors import RtdmdError
from rtdmd.files import parse_jsonl
from rtdmd.registry import Registry
from rtdmd.seeding import seed_for

PACKAGE_PREFIX = "package:"
GENERATED_PREFIX = "generated:"
Format = Literal["jsonl", "txt", "tsv", "csv", "json"]
FORMATS: tuple[str, ...] = ("jsonl", "txt", "tsv", "csv", "json")
# generators live where their vocabulary does (a higher layer), registered on first use
GENERATED_PROMPTS: Registry[Callable[[], bytes]] = Registry(
    "prompt generator", lazy={"geneval-train.jsonl": "rtdmd.geneval.prompts"}
)


class PromptFileError(RtdmdError, ValueError):
    """A prompt file that cannot be read as one: not UTF-8, a torn JSON line, no prompts."""


def read_source(source: str | Path) -> bytes:
    """The bytes of a file path, a ``package:<python.package>/<relative path>`` resource or a
    ``generated:<name>`` generator's output."""
    if isinstance(source, str) and source.startswith(GENERATED_PREFIX):
        return GENERATED_PROMPTS.get(source[len(GENERATED_PREFIX) :])()
    if isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
        package, _, relative = source[len(PACKAGE_PREFIX) :].partition("/")
        if not package or not relative:
            raise PromptFileError(f"prompt file {source!r}: expected package:<python.package>/<relative path>")
        try:
            resource = resources.files(package).joinpath(relative)
        except (ModuleNotFoundError, TypeError):  # TypeError: a module, not a package
            raise FileNotFoundError(f"prompt file {source}: {package!r} is not an installed Python package") from None
        if not resource.is_file():
            raise FileNotFoundError(f"prompt file {source} does not exist")
        return resource.read_bytes()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    return path.read_bytes()


def decode_text(data: bytes, name: str) -> str:
    """``data`` as UTF-8 text, or a :class:`PromptFileError` naming the file and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PromptFileError(
            f"{name} is not UTF-8 text (line {line}, byte {error.start}: {data[error.start : error.start + 1]!r}): "
            "save it as UTF-8"
        ) from None


def jsonl_values(text: str, name: str) -> list[tuple[int, object]]:
    """``(line number, value)`` of each non-empty line of a prompt file's JSON lines; a line that is not
    JSON (a torn write, a hand edit) is a :class:`PromptFileError` naming the file and the line."""
    return parse_jsonl(text, name, repair="a torn or edited line; repair or delete it", error=PromptFileError)


def raw_records(data: bytes, fmt: Format, name: str) -> list[dict[str, Any] | str]:
    """The records of a prompt file's bytes, as its format holds them: dicts (jsonl, tsv, csv, json
    objects) or strings (txt lines, json strings). The one reader of prompt files: training prompts
    (:func:`parse_records`) and benchmark suites (:mod:`rtdmd.suites`) both go through it."""
    text = decode_text(data, name)
    if fmt == "txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if fmt == "jsonl":
        return [value for _, value in jsonl_values(text, name)]
    if fmt in ("tsv", "csv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ","))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(
            f"{name} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    if not isinstance(records, list):
        raise PromptFileError("a .json suite file must hold a list of prompts or of objects")
    return records


def format_of(name: str) -> Format:
    """A prompt file's format from its name's suffix (``.txt`` for anything unknown)."""
    suffix = Path(name).suffix[1:]
    return suffix if suffix in FORMATS else "txt"  # type: ignore[return-value]


def parse_records(data: bytes, name: str) -> list[dict]:
    """Training records of a prompt file's bytes: ``{"prompt": ...}`` with the rest of each record
    (a ``.jsonl`` record keeps GenEval's metadata); every record needs a "prompt"."""
    records = []
    for number, record in enumerate(raw_records(data, format_of(name), name), start=1):
        if isinstance(record, str):
            record = {"prompt": record}
        if not isinstance(record, dict) or not str(record.get("prompt", "")).strip():
            raise PromptFileError(f'prompt file {name}: record {number} has no "prompt"')
        records.append(record | {"prompt": str(record["prompt"]).strip()})
    return records


def read_prompt_records(path: str | Path, sha256: str = "") -> list[dict]:
    """The records of a prompt file (see the module docstring; a ``.jsonl`` record keeps its metadata,
    e.g. GenEval's ``tag``/``include``/``exclude``); ``sha256`` (if given) must match the file."""
    data = read_source(path)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise PromptFileError(f"prompt file {path} has sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256}")
    records = parse_records(data, str(path))
    if not records:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return records


def read_prompt_file(path: str | Path, sha256: str = "") -> list[str]:
    """The prompts of a prompt file (see :func:`read_prompt_records`)."""
    return [record["prompt"] for record in read_prompt_records(path, sha256)]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_prompts: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed_for(seed, "epoch", epoch))
    return tuple(torch.randperm(num_prompts, generator=gen).tolist())


def batch_indices(seed: int, step: int, batch_size: int, num_prompts: int) -> list[int]:
    """Prompt indices of training step ``step``'s global batch."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_prompts)
        out.append(_epoch_permutation(seed, epoch, num_prompts)[offset])
    return out
