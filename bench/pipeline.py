"""The harness as a library call: one method-by-suite leaderboard, from prompts to report.

:func:`run_pipeline` is what ``rtdmd-bench run`` does after parsing its options; a notebook or a script
calls it directly. Each stage reuses what a previous run finished (images, scores), so a rerun with
the same arguments does only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.aggregate import aggregate_stage
from bench.claims import load_claims
from bench.generate import generate_stage
from bench.methods import MethodCard, load_method
from bench.plan import RunPlan
from bench.report import report_stage
from bench.runfiles import SUMMARY, metadata_of
from bench.score import score_stage
from rtdmd.errors import RtdmdError
from rtdmd.rewards.base import require_metadata
from rtdmd.suites import Suite, load_suite

Progress = Callable[[int, int], None]


class PipelineError(RtdmdError, ValueError):
    """Arguments of a run that cannot work together (a reference that is not one of the methods, no metrics)."""


def writable(out: Path) -> Path:
    """``out``, created; an error naming it if nothing can be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as error:
        raise PermissionError(f"output directory {out} is not writable ({error.strerror or error})") from None
    return out


def metric_names(text: str, suite: Suite) -> list[str]:
    """Comma-separated names, or the suite card's defaults; unknown names (with a did-you-mean) and a
    suite without the metadata a metric needs fail here, before anything is generated."""
    names = [m.strip() for m in text.split(",") if m.strip()] or list(suite.card.default_metrics)
    if not names:
        raise PipelineError(f"suite {suite.card.name} names no default metrics: pass --metrics")
    require_metadata(names, [metadata_of(row) for row in suite.rows], f"suite {suite.card.name}")
    return names


def run_pipeline(
    plan: RunPlan,
    *,
    prompts_dir: Path | None = None,
    seeds: tuple[int, ...] = (0,),
    limit: int = 0,
    images_per_prompt: int = 0,
    device: str = "auto",
    html: bool = False,
    compile: bool = False,
    progress: Callable[[str], Progress] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Generate, score, aggregate and report every method of ``plan`` on its suite (``html``: also the
    browsable page; ``compile``: every card with ``compile: true``); returns the report's path. ``progress(label)`` makes a ``(done, total)`` callback per stage (with ``.close()``
    if it has one); ``log`` receives one line per stage and the notes (prompts a text encoder cut)."""
    claim_card = load_claims(plan.claims) if plan.claims else None
    suite = load_suite(plan.suite, prompts_dir, images_per_prompt=images_per_prompt)
    names = metric_names(plan.metrics, suite)
    cards = [compiled(load_method(arg)) if compile else load_method(arg) for arg in plan.methods]
    if plan.reference and plan.reference not in [c.name for c in cards]:
        raise PipelineError(f"--reference {plan.reference} must be one of the --method cards")
    target = plan.report or plan.out / f"{suite.card.name}_leaderboard.md"
    log(
        f"{'default toy run' if plan.default else 'run'}: {', '.join(c.name for c in cards)} on {suite.card.name}, "
        f"metrics {', '.join(names)}, reference {plan.reference or 'none'} -> {plan.out}/, {target}"
    )
    writable(plan.out)
    writable(target.parent)
    roots = []
    for card in sorted(cards, key=lambda c: c.name != plan.reference):  # the reference first
        roots.append(generate_run(card, suite, plan.out, seeds, limit, images_per_prompt, device, progress, log))
        log(score_run(roots[-1], names, device, progress))
    summaries = [aggregate_stage(root, plan.reference if root.parent.name != plan.reference else "") for root in roots]
    report_stage([Path(s["run_dir"]) / SUMMARY for s in summaries], target, claims=claim_card, html=html)
    log(f"leaderboard: {target} (+ .json, .png{', .html' if html else ''})")
    return target


def compiled(card: MethodCard) -> MethodCard:
    """``card`` with ``compile: true`` (regional compilation of the transformer and the VAE decoder): other
    images in their last bits, so another fingerprint and run folder contents of their own."""
    return dataclasses.replace(card, compile=True)


def generate_run(
    card: MethodCard,
    suite: Suite,
    out: Path,
    seeds: tuple[int, ...] = (0,),
    limit: int = 0,
    images_per_prompt: int = 0,
    device: str = "auto",
    progress: Callable[[str], Progress] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Generate what is missing of one method on one suite; returns its run folder."""
    with stage_progress(progress, f"generate {card.name}/{suite.card.name}") as bar:
        result = generate_stage(
            card, suite, out, seeds=seeds, limit=limit, images_per_prompt=images_per_prompt, device=device, progress=bar
        )
    made, seconds = result["generated"], result["sampling_seconds"]
    speed = f" in {seconds:.1f} s ({made / seconds:.2f} images/s after loading)" if made and seconds > 0 else ""
    log(
        f"{card.name}/{suite.card.name}: {made} generated{speed}, {result['skipped']} reused ({result['images']} images)"
    )
    for note in result["notes"]:
        log(f"note: {note}")
    return Path(result["run_dir"])


def score_run(root: Path, metrics: list[str], device: str, progress: Callable[[str], Progress] | None = None) -> str:
    """Score one run folder; the line that says what was computed and what reused."""
    with stage_progress(progress, f"score {root.parent.name}/{root.name}") as bar:
        result = score_stage(root, metrics, device=device, progress=bar)
    sets = result["set_scored"] + result["set_cached"]
    set_note = f"; set metrics: {result['set_scored']} computed, {result['set_cached']} reused" if sets else ""
    made, seconds = result["scored"], result["scoring_seconds"]
    speed = f" in {seconds:.1f} s ({made / seconds:.1f} scores/s after loading)" if made and seconds > 0 else ""
    return f"{root.parent.name}/{root.name}: {made} scores computed{speed}, {result['cached']} reused{set_note}"


@contextlib.contextmanager
def stage_progress(progress: Callable[[str], Progress] | None, label: str) -> Iterator[Progress | None]:
    """A progress callback for one stage (None without ``progress``), closed however the stage ends."""
    bar = progress(label) if progress else None
    try:
        yield bar
    finally:
        if hasattr(bar, "close"):
            bar.close()
