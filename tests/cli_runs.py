"""Running the CLIs in-process, as the fault tests do: exit code, stderr, the one error line."""

from __future__ import annotations

import sys


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of a CLI's ``main()`` with ``argv``."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["prog", *argv]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """stderr is one ``error:`` line, without a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]
