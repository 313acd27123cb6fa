"""The project's error base and the one place each CLI turns failures into one line.

:class:`RtdmdError` marks a failure caused by input, the environment or a fault (a torn file, a
missing GPU), not by a bug: every error class of the project derives from it (and, where callers
catch them so, from the matching built-in: ``ValueError``, ``FileNotFoundError``, ...). The CLIs
print such failures, and the operating system's (no space, read-only, permission), as one line
``error: <what, where, what to do>`` and exit 2; a traceback appears only for a bug or with
``RTDMD_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

DEBUG_ENV = "RTDMD_DEBUG"
EXIT_CODE = 2


class RtdmdError(Exception):
    """A failure of input, environment or a fault: its message is the whole story (one line)."""


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _os_line(error: OSError) -> str | None:
    if error.errno is None:  # raised by this project with its own message (e.g. an unwritable --out)
        return str(error)
    where = f" {error.filename}" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device writing{where}: free some space and rerun (finished work is kept)"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where} ({error.strerror}): choose a writable location (run_dir=..., --out ...)"
    if error.filename:  # a file the run needed or wanted to write: not a bug of ours
        return f"{error.strerror}: {error.filename}"
    return None


def describe(error: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(error, RtdmdError):
        return str(error).strip("'\"") if isinstance(error, KeyError) else str(error)
    if isinstance(error, OSError):
        return _os_line(error)
    return None


@contextlib.contextmanager
def one_line_errors(print_line) -> Iterator[None]:
    """Expected failures inside: ``print_line(message)`` and exit :data:`EXIT_CODE`. Bugs, and
    everything under ``RTDMD_DEBUG=1``, propagate with their traceback."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs right here
        line = describe(error)
        if line is None or debug_requested():
            raise
        print_line(line)
        raise SystemExit(EXIT_CODE) from None


# ---------------------------------------------------------------- fault injection (tests)

KILL_ENV = "RTDMD_KILL_AT"  # "<site>:<n>": SIGKILL this process at its n-th pass through <site>
FULL_ENV = "RTDMD_FULL_AT"  # "<n>": the n-th durable write of this process fails as on a full disk
_passes: dict[str, int] = {}


def kill_point(site: str) -> None:
    """A place where a real run can be killed (between two durable writes). With ``RTDMD_KILL_AT``
    naming it, the n-th pass kills the process, so a test reaches every such place without timing."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec.startswith(site + ":"):
        return
    _passes[site] = _passes.get(site, 0) + 1
    if _passes[site] == int(spec.rsplit(":", 1)[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_fault(path: object) -> OSError | None:
    """The error a full disk would raise at this durable write (:mod:`rtdmd.files` asks before each
    commit) when ``RTDMD_FULL_AT`` names its pass; otherwise None."""
    spec = os.environ.get(FULL_ENV, "")
    if not spec:
        return None
    _passes["write"] = _passes.get("write", 0) + 1
    if _passes["write"] != int(spec):
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
