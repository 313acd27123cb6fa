"""``rtdmd-bench weights``: what each metric's weights are, where they were found, and fetching them.

A metric declares its files as ``weights: tuple[WeightFiles, ...]`` on its reward class
(:mod:`rtdmd.weights`); metrics without that attribute need no downloads (toy metrics
ship inside the package, ``brightness`` has none).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rtdmd.weights import ENV, fetch, locate, offline, weights_root

weights_app = typer.Typer(
    help=f"Reward weights: list what each metric needs and what is present; fetch them. One root for all "
    f"metrics: --weights-dir or ${ENV} (<root>/<hub repo>/<files>, URL files in <root>/urls/); without "
    "one, the Hugging Face cache. Works offline (HF_HUB_OFFLINE=1) once the files are there.",
    no_args_is_help=True,
)

WEIGHTS_DIR = typer.Option(
    None, "--weights-dir", help=f"Root folder of all reward weights (default: ${ENV}, else the Hugging Face cache)."
)


def metrics_with_weights() -> dict[str, tuple]:
    """``{metric: its WeightFiles}`` for every registered metric that needs downloaded weights."""
    from rtdmd.rewards import REWARDS  # every metric's module (open_clip, ...): only when listing

    return {name: REWARDS.get(name).weights for name in REWARDS.names() if hasattr(REWARDS.get(name), "weights")}


@weights_app.command("list")
def list_weights(
    weights_dir: Path | None = WEIGHTS_DIR,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table (for scripts)."),
) -> None:
    """Each metric's files and the folder they were found in (or `missing`)."""
    console, root = Console(), weights_root(weights_dir)
    if as_json:
        rows = [
            {
                "metric": metric,
                "source": spec.repo or spec.url,
                "files": list(spec.names),
                "found_in": str(found) if (found := locate(spec, root)) else None,
            }
            for metric, specs in metrics_with_weights().items()
            for spec in specs
        ]
        console.print_json(data=rows)
        return
    table = Table(title=f"reward weights (root: {root or 'none: the Hugging Face cache'})")
    for column in ("metric", "source", "files", "found in"):
        table.add_column(column, overflow="fold")
    for metric, specs in metrics_with_weights().items():
        for spec in specs:
            found = locate(spec, root)
            table.add_row(
                metric,
                spec.repo or spec.url,
                ", ".join(spec.names),
                str(found) if found else "[red]missing[/red]",
            )
    console.print(table)


@weights_app.command("fetch")
def fetch_weights(
    metrics: list[str] = typer.Argument(..., help="Metric names (see `rtdmd-bench weights list`)."),
    weights_dir: Path | None = WEIGHTS_DIR,
) -> None:
    """Download the files of the given metrics (skipping those already present)."""
    known = metrics_with_weights()
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise typer.BadParameter(f"no downloadable weights for {unknown}; metrics with weights: {sorted(known)}")
    if offline():
        raise typer.BadParameter("HF_HUB_OFFLINE=1 is set: unset it to download (or copy the files by hand)")
    console, root = Console(), weights_root(weights_dir)
    for metric in metrics:
        for spec in known[metric]:
            if (found := locate(spec, root)) is not None:
                console.print(f"{metric}: {', '.join(spec.names)} already in {found}")
                continue
            console.print(f"{metric}: fetching {', '.join(spec.names)} from {spec.repo or spec.url}")
            try:
                console.print(f"  -> {fetch(spec, root)}")
            except Exception as error:  # network, gated repo, checksum: say which file and stop
                console.print(f"[red]{metric}: {spec.repo or spec.url}: {type(error).__name__}: {error}[/red]")
                raise typer.Exit(1) from None
