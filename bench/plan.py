"""What ``rtdmd-bench run`` runs: the default (the toy leaderboard) and the user's options over it.

Kept apart from :mod:`bench.pipeline` (which loads torch and the models) so that the CLI's help and
argument checks answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DefaultRun:
    """What ``rtdmd-bench run`` does without arguments: the toy-world leaderboard on the quick profile
    (``toy-geneval-quick``, minutes on a CPU); tools/toy_leaderboard.sh runs the full protocol."""

    methods: tuple[str, ...] = (
        "toy-teacher",
        "toy-euler4",
        "toy-dmd",
        "toy-acdmd",
        "toy-rtdmd",
        "toy-rtdmd-grpo-all-steps",
        "toy-rtdmd-no-bp",
        "toy-rtdmd-no-dm",
        "toy-rtdmd-bp-only",
        "toy-rtdmd-dmd-only",
    )
    suite: str = "toy-geneval-quick"
    metrics: tuple[str, ...] = ()  # () = the suite card's default metrics
    reference: str = "toy-teacher"
    out: Path = Path("bench_runs")
    report: Path | None = None  # <out>/<suite>_leaderboard.md; tools/toy_leaderboard.sh writes reports/toy/
    claims: str = "toy"  # bench/cards/claims/toy.yaml: the aims, stated as held or not in the report

    def __post_init__(self) -> None:
        if self.reference and self.reference not in self.methods:
            raise ValueError(f"default reference {self.reference} is not one of the default methods")


DEFAULT_RUN = DefaultRun()


@dataclass(frozen=True)
class RunPlan:
    """The resolved arguments of ``run``: each option not given falls back to :data:`DEFAULT_RUN`."""

    methods: tuple[str, ...]
    suite: str
    metrics: str
    reference: str
    out: Path
    report: Path | None  # None: <out>/<suite>_leaderboard.md
    default: bool  # neither --method nor --suite was given
    claims: str = ""  # a claim card checked in the report ("" = none)


def resolve_run(
    method: list[str] | None, suite: str, metrics: str, reference: str, out: Path | None, report, claims: str = ""
) -> RunPlan:
    """Fill what the user left out from :data:`DEFAULT_RUN` (read at call time, so tests can swap it)."""
    default = DEFAULT_RUN
    return RunPlan(
        methods=tuple(method) if method else default.methods,
        suite=suite or default.suite,
        metrics=metrics or ("" if suite else ",".join(default.metrics)),
        # the default reference is one of the default methods; with your own methods pass --reference
        reference=reference or ("" if method else default.reference),
        out=out or default.out,
        report=report or (default.report if not method and not suite else None),
        default=not method and not suite,
        claims=claims or (default.claims if not method and not suite else ""),
    )
