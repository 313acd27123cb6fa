"""Durable files: whole files written atomically, JSON-lines files appended whole lines at a time.

Every file the project writes goes through here. A whole file goes to a temporary file beside its
target, is flushed to disk, renamed over the target, and the directory entry is flushed too: a crash
or a full disk leaves the old file or the new one, never a torn file. An appended JSON-lines file
(rank parts, training stats, sample indexes) is flushed and synced after each batch of rows, and a
torn last line (what a kill or a full disk mid-append leaves) is cut before the next append.

:func:`parse_jsonl` / :func:`read_jsonl` are the one reader of JSON-lines files (prompt files, run
files, stats), with the caller's policy for a line that is not JSON.

Each write passes :func:`rtdmd.errors.write_fault` just before it commits, so a test can make any one
of them fail as a full disk would (``RTDMD_FULL_AT``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rtdmd import errors
from rtdmd.errors import RtdmdError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` durably, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if fault := errors.write_fault(path):
            raise fault
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the file gets what open() would give it
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file (config, JSON, markdown) atomically, as UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_image_atomic(image: Any, path: str | Path, **options: Any) -> Path:
    """Write a PIL image atomically, in the format its suffix names (PNG for ``.png``)."""
    buffer = io.BytesIO()
    image.save(buffer, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"), **options)
    return write_bytes_atomic(path, buffer.getvalue())


def cut_torn_tail(path: Path) -> None:
    """Truncate ``path`` just after its last newline: a line without one was never finished."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            if end == size and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                fh.truncate(start + newline + 1)
                return
            end = start
        fh.truncate(0)


class JsonLinesAppender:
    """Append rows to a JSON-lines file: each :meth:`append` writes whole lines, then flushes and syncs
    them, so a kill loses at most the batch being written. Opening it first cuts a torn last line, so
    a fragment never fuses with the next row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close() / the with block

    def append(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if fault := errors.write_fault(self.path):
            last = len(text.rstrip("\n").rsplit("\n", 1)[-1])
            self._fh.write(text[: len(text) - 1 - last // 2])  # a disk full mid-write: the last line torn
            self._fh.flush()
            raise fault
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonLinesAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- reading JSON lines


class JsonLinesError(RtdmdError, ValueError):
    """A line of a JSON-lines file that is not JSON where the reader cannot recompute what it held."""


def parse_jsonl(
    text: str,
    name: str,
    *,
    bad: str = "stop",
    repair: str = "repair or delete that line",
    error: type[Exception] = JsonLinesError,
) -> list[tuple[int, Any]]:
    """``(line number, value)`` of each non-empty line of a JSON-lines text. A line that is not JSON
    (a torn write, a hand edit) is, by ``bad``: ``"skip"``ped (the caller recomputes what it held:
    rank parts, caches, sample indexes), dropped only when it is the ``"last"`` line (a kill mid-append
    leaves just that; an earlier one stops), or a ``"stop"``: an ``error`` naming ``name``, the line
    and ``repair``."""
    lines = text.splitlines()
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as decode:
            if bad == "skip" or (bad == "last" and number == len(lines)):
                continue
            raise error(
                f"{name} line {number} is not valid JSON ({decode.msg} at column {decode.colno}): {repair}"
            ) from None
    return values


def read_jsonl(path: Path, **policy: Any) -> list[Any]:
    """The values of a JSON-lines file (``[]`` if it does not exist), read by :func:`parse_jsonl`."""
    if not path.exists():
        return []
    return [value for _, value in parse_jsonl(path.read_text(encoding="utf-8", errors="replace"), str(path), **policy)]
