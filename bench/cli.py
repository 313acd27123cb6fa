"""``rtdmd-bench``: the benchmark harness's command line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="rtdmd benchmark harness: prompt suites -> images -> scores -> leaderboards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """rtdmd benchmark harness: prompt suites -> images -> scores -> leaderboards."""


@app.command()
def schedules(
    steps: int = typer.Option(4, "--steps", "-n", help="Number of sampling steps."),
    resolution: list[int] = typer.Option(
        [512, 1024], "--resolution", "-r", help="Square image sizes in pixels (repeatable)."
    ),
    default_spacing: bool = typer.Option(
        False,
        "--default-spacing",
        help="Use each pipeline's default raw times instead of RTDMD's 1000/750/500/250 (4 steps only).",
    ),
) -> None:
    """Print the sigma schedule each registered family uses, from its released scheduler config.

    The FLUX schedules depend on resolution: RTDMD trains FLUX at 512 px but its inference configs
    generate at 1024 px, which shifts every step (rtdmd_method.md §3.1).
    """
    from rtdmd.backbones import BACKBONES
    from rtdmd.backbones.base import reference_schedule
    from rtdmd.flow.schedules import RTDMD_TIMESTEPS

    if not default_spacing and steps != len(RTDMD_TIMESTEPS):
        console.print(
            f"[red]RTDMD's step list has {len(RTDMD_TIMESTEPS)} steps; use --default-spacing for --steps {steps}[/]"
        )
        raise typer.Exit(2)
    timesteps = None if default_spacing else RTDMD_TIMESTEPS
    table = Table(
        title=f"sigma schedules, {steps} steps, {'pipeline default spacing' if default_spacing else 'RTDMD raw times 1000/750/500/250'}"
    )
    table.add_column("family")
    table.add_column("resolution", justify="right")
    table.add_column("sigmas (terminal 0 appended)")
    for name in BACKBONES:
        for res in resolution:
            sigmas = reference_schedule(BACKBONES.get(name), steps, res, res, timesteps)
            table.add_row(name, str(res), ", ".join(f"{s:.4f}" for s in sigmas.tolist()))
    console.print(table)


def main() -> None:
    app(prog_name="rtdmd-bench")


if __name__ == "__main__":
    sys.exit(main())
