"""The main environment's side of the GenEval detector: spawns :mod:`rtdmd.geneval.worker` in its own
environment (``tox -e geneval-mmdet``) and exchanges files and JSON lines with it.

Images go to the worker as PNG files, written from RGB pixels, which the worker's mmdet reads with
OpenCV (BGR), as the official ``evaluate_images.py`` reads generated PNGs. Detections come back in an
npz file per batch (see the worker's docstring for the layout). Only numpy, PIL and the standard
library are used here, so the client also imports inside the detector environment (its tests do).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtdmd.errors import RtdmdError

WORKER = Path(__file__).with_name("worker.py")
PYTHON_ENV = "RTDMD_GENEVAL_PYTHON"  # the detector environment's python, overriding the tox default
TOX_ENV = Path(".tox") / "geneval-mmdet" / "bin" / "python"
STDERR_TAIL_CHARS = 4000  # of the worker's stderr, quoted in errors
START_TIMEOUT_S = 600.0  # building Swin-S and loading 0.3 GB; slow disks and first CUDA init
BATCH_TIMEOUT_S = 3600.0  # 64 images at about 5 s each on a CPU, with margin


class DetectorError(RtdmdError, RuntimeError):
    """The worker died, timed out, broke the protocol or reported a failure."""


class MissingDetectorEnv(RtdmdError, FileNotFoundError):
    """No python of the ``geneval-mmdet`` environment."""


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections in mmdet's order: ``boxes [N, 4]`` float32 pixels (x1, y1, x2, y2),
    ``scores [N]`` float32, ``labels [N]`` int64 (COCO index, mmdet order), ``masks [N, H, W]`` bool."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def default_python() -> Path:
    """``$RTDMD_GENEVAL_PYTHON``, else ``.tox/geneval-mmdet/bin/python`` of the working directory or of
    the source tree holding this package; :class:`MissingDetectorEnv` when none exists."""
    if chosen := os.environ.get(PYTHON_ENV):
        if not Path(chosen).is_file():
            raise MissingDetectorEnv(f"${PYTHON_ENV}={chosen} is not a file")
        return Path(chosen)
    candidates = [Path.cwd() / TOX_ENV, Path(__file__).resolve().parents[2] / TOX_ENV]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingDetectorEnv(
        "GenEval's detector runs in its own environment, not found at "
        + " or ".join(str(c) for c in dict.fromkeys(candidates))
        + f": build it with `tox -e geneval-mmdet` in the repository, or set ${PYTHON_ENV} to its python"
    )


def worker_command(
    python: str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    config: str | None = None,
    device: str = "auto",
    random_weights_for_tests: int | None = None,
    threads: int | None = None,
) -> list[str]:
    """The command line that starts the real worker (``-u``: unbuffered, replies are not held back)."""
    cmd = [str(python or default_python()), "-u", str(WORKER), "--device", device]
    if config:
        cmd += ["--config", str(config)]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    if random_weights_for_tests is not None:
        cmd += ["--random-weights-for-tests", str(random_weights_for_tests)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def write_png(pixels: np.ndarray, path: Path) -> None:
    """An ``[H, W, 3]`` uint8 RGB image as a PNG (lossless; compression level 1 for speed)."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(path, compress_level=1)


def read_batch(path: Path, counts: Sequence[int]) -> list[ImageDetections]:
    """Decode the worker's npz: per image ``boxes_i, scores_i, labels_i, masks_i`` (packed), ``shape_i``."""
    out = []
    with np.load(path) as data:
        for i, count in enumerate(counts):
            shape = tuple(int(s) for s in data[f"shape_{i}"])
            masks = np.unpackbits(data[f"masks_{i}"], count=int(np.prod(shape))).astype(bool).reshape(shape)
            found = ImageDetections(data[f"boxes_{i}"], data[f"scores_{i}"], data[f"labels_{i}"], masks)
            if not len(found) == len(found.boxes) == len(found.labels) == len(masks) == count:
                raise DetectorError(f"{path}: image {i} has inconsistent arrays (expected {count} detections)")
            out.append(found)
    return out


class DetectorClient:
    """A running worker: :meth:`detect` sends uint8 RGB images in batches and returns their detections.

    ``command`` is the worker's command line (:func:`worker_command`, or any program that speaks the
    protocol). Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        command: Sequence[str],
        batch_size: int = 64,
        min_score: float | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        batch_timeout_s: float = BATCH_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = [str(c) for c in command]
        self.batch_size = batch_size
        self.min_score = min_score
        self.batch_timeout_s = batch_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="rtdmd-geneval-"))
        # stderr goes to a file, read on failure: an unread pipe would block the worker once full
        self._stderr = open(self.workdir / "worker.stderr", "w+b")  # noqa: SIM115 (closed by close())
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._next_id = 0
        self.proc: subprocess.Popen | None = None
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                text=True,
                bufsize=1,
                env={**os.environ, **(env or {})},
            )
        except OSError as error:
            self._cleanup()
            raise DetectorError(f"cannot start the GenEval detector worker {self.command}: {error}") from error
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        self.ready = self._receive(start_timeout_s, "start")
        if self.ready.get("event") != "ready":
            self.close(wait_s=0)
            raise DetectorError(f"worker's first message is not 'ready': {self.ready}")
        self.classes: list[str] = list(self.ready.get("classes", []))

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - STDERR_TAIL_CHARS))
        return self._stderr.read().decode("utf-8", "replace")

    def _failure(self, what: str) -> DetectorError:
        code = self.proc.poll()
        status = f"exited with code {code}" if code is not None else "still running"
        return DetectorError(
            f"GenEval detector worker ({' '.join(self.command)}) {what}; it {status}. "
            f"Last stderr:\n{self.stderr_tail()}"
        )

    def _receive(self, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    error = self._failure(f"did not answer within {timeout_s:g} s ({what})")
                    self.close(wait_s=0)  # presumed stuck
                    raise error from None
                continue
            if line is None:
                self.proc.wait(timeout=30)
                error = self._failure(f"stopped before answering ({what})")
                self._cleanup()
                raise error
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                error = self._failure(f"wrote a line that is not JSON ({what}): {line[:200]!r}")
                self.close(wait_s=0)  # the protocol is broken
                raise error from None

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.proc.wait(timeout=30)
            error = self._failure("stopped reading requests")
            self._cleanup()
            raise error from None

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        """One request: ``images`` (uint8 RGB ``[H, W, 3]``) -> their detections, in order."""
        if self.proc.poll() is not None:
            raise self._failure("is not running")
        batch_id, self._next_id = self._next_id, self._next_id + 1
        folder = self.workdir / f"batch{batch_id}"
        folder.mkdir()
        try:
            paths = [folder / f"{i:05d}.png" for i in range(len(images))]
            for pixels, path in zip(images, paths, strict=True):
                write_png(pixels, path)
            out = folder / "detections.npz"
            request = {"id": batch_id, "images": [str(p) for p in paths], "out": str(out), "min_score": self.min_score}
            self._send(request)
            reply = self._receive(self.batch_timeout_s, f"batch {batch_id}")
            if reply.get("id") != batch_id:
                raise self._failure(f"answered request {reply.get('id')} to request {batch_id}")
            if not reply.get("ok"):
                raise DetectorError(f"GenEval detector worker failed on batch {batch_id}:\n{reply.get('error', '')}")
            return read_batch(out, reply["counts"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def detect(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        """All ``images`` in requests of ``batch_size``."""
        out: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            out += self.detect_batch(images[start : start + self.batch_size])
        return out

    def close(self, wait_s: float = 10.0) -> None:
        """Ask the worker to quit; kill it if it has not within ``wait_s`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=wait_s)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            if self.proc.poll() is not None:  # exited: the reader meets end of file, then its pipe can close
                self._reader.join(timeout=5)
                if not self._reader.is_alive():
                    self.proc.stdout.close()
        self._stderr.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.kill()
