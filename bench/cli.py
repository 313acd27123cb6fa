"""``rtdmd-bench``: prompt suites -> images -> scores -> summaries -> leaderboards.

    rtdmd-bench run                    # the toy default run (DEFAULT_RUN): toy methods on toy-geneval
    rtdmd-bench run --method tiny-cps4 --method tiny-teacher --suite drawbench --metrics brightness \\
        --reference tiny-teacher --prompts-dir ../shared/prompts --out bench_runs
    rtdmd-bench generate --method tiny-cps4 --suite geneval --limit 8
    rtdmd-bench score bench_runs/tiny-cps4/geneval --metrics brightness
    rtdmd-bench aggregate bench_runs/tiny-cps4/geneval --reference tiny-teacher
    rtdmd-bench report bench_runs/*/*/summary.json --out reports/leaderboard.md
    rtdmd-bench suites [NAME]          rtdmd-bench methods [NAME]          rtdmd-bench schedules

Commands import the pipeline (torch, the models, the metrics) when they run, so that ``--help`` and
argument errors answer in 0.1 s; everything else imports at module level.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bench import plan as run_plan
from bench.weights_cli import weights_app
from rtdmd.errors import one_line_errors

app = typer.Typer(
    help="rtdmd benchmark harness: prompt suites -> images -> scores -> summaries -> leaderboards. "
    "`rtdmd-bench run` without arguments runs the toy default (the ten toy methods on toy-geneval-quick, about 8 "
    "minutes on 2 CPU cores; its expected output is committed in reports/toy/quick/).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _options(
    weights_dir: Path | None = typer.Option(
        None,
        "--weights-dir",
        help="Root folder of all reward weights (<root>/<hub repo>/...; sets $RTDMD_WEIGHTS for this run). "
        "Default: $RTDMD_WEIGHTS, else the Hugging Face cache. See `rtdmd-bench weights list`.",
    ),
    geneval_backend: str | None = typer.Option(
        None,
        "--geneval-backend",
        help="GenEval's detector: 'port' (default: the PyTorch port in this process, CPU or GPU) or 'mmdet' "
        "(the reference mmdet worker in its own environment, `tox -e geneval-mmdet`; sets $RTDMD_GENEVAL_BACKEND).",
    ),
) -> None:
    if weights_dir is not None:
        os.environ["RTDMD_WEIGHTS"] = str(weights_dir)
    if geneval_backend is not None:
        if geneval_backend not in ("port", "mmdet"):
            raise typer.BadParameter(f"{geneval_backend!r}: choose port or mmdet", param_hint="--geneval-backend")
        os.environ["RTDMD_GENEVAL_BACKEND"] = geneval_backend


OUT = typer.Option(Path("bench_runs"), "--out", "-o", help="Root of the run directories (<out>/<method>/<suite>/).")
PROMPTS_DIR = typer.Option(
    None, "--prompts-dir", help="Local directory holding the suites' upstream files (e.g. ../shared/prompts)."
)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0"`` or ``"0,1,2"`` -> distinct non-negative run seeds, in the order given."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give run seeds as integers, e.g. 0 or 0,1,2") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"{text!r}: run seeds must be distinct and >= 0")
    return seeds


def check_device(name: str) -> str:
    """A device this machine has (`rtdmd.distributed.resolve_device`), checked before any work."""
    from rtdmd.distributed import DeviceError, resolve_device

    try:
        resolve_device(name)
    except DeviceError as error:
        raise typer.BadParameter(str(error)) from None
    return name


SEEDS = typer.Option(
    "0",
    "--seeds",
    "--seed",
    callback=parse_seeds,
    help="Run seed(s), e.g. 0 or 0,1,2: image k of prompt p under seed s draws its noise from "
    "seed_for(s, '<suite>/<p>', k, step). Several seeds: the value is their mean, the interval resamples "
    "prompts with all their seeds' images, and each seed's own value is reported too.",
)
LIMIT = typer.Option(0, "--limit", min=0, help="Only the first N prompts of the suite (0 = all).")
IPP = typer.Option(0, "--images-per-prompt", min=0, help="Images per prompt and seed (0 = the suite card's protocol).")
DEVICE = typer.Option(
    "auto",
    "--device",
    callback=check_device,
    help="auto | cpu | cuda | cuda:N (auto: a GPU where there is one; under torchrun: one device per process).",
)
COMPILE = typer.Option(
    False,
    "--compile",
    help="Compile the transformer's blocks and the VAE decoder (torch.compile, regional: ~15-50 s once per "
    "shape): about 1.4x the images/s on a GPU. The images differ from eager ones in their last bits, so the "
    "card's fingerprint changes and eager images in the folder are not reused.",
)
HTML = typer.Option(
    False,
    "--html",
    help="Also write <report>.html: one self-contained page with sortable tables and, per category, the images "
    "of every run side by side with their scores.",
)
JSON = typer.Option(False, "--json", help="Print JSON instead of a table (for scripts).")
METRICS = typer.Option(
    "", "--metrics", "-m", help="Comma-separated metric names (default: the suite card's default metrics)."
)


@contextmanager
def clean_errors() -> Iterator[None]:
    """Expected failures (:mod:`rtdmd.errors`) print one line and exit 2; only bugs show a traceback."""
    with one_line_errors(lambda line: err.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)):
        yield


class Bar:
    """A rich progress bar with ETA, started at the first update."""

    def __init__(self, label: str) -> None:
        self.label, self.progress, self.task = label, None, None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,  # the summary line that follows says what was done; an error stands alone
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def say(line: str) -> None:
    """A pipeline's line: notes to stderr (yellow), the rest to stdout."""
    if line.startswith("note: "):
        err.print(f"[yellow]note:[/] {escape(line[len('note: ') :])}", soft_wrap=True)
    else:
        console.print(line, markup=False, highlight=False)


def run_help(default: run_plan.DefaultRun) -> str:
    metrics = ", ".join(default.metrics) or "its default metrics"
    return (
        "Generate, score, aggregate and report, for each method on one suite. Reruns reuse every finished image and score.\n\n"
        f"Without arguments it runs the toy default: methods {', '.join(default.methods)} on suite {default.suite} "
        f"({metrics}), paired against {default.reference}, into {default.out}/ with the leaderboard at "
        f"{default.report or f'{default.out}/<suite>_leaderboard.md'} (+ .json, .png), stating the claims of "
        f"bench/cards/claims/{default.claims}.yaml as held or not, with their significance (the committed "
        "reports/toy/quick/ is this run; tools/toy_leaderboard.sh rewrites the full protocol's reports/toy/leaderboard.md). "
        "--method and --suite replace the default methods and suite; every other option still applies.\n\n"
        "Example: rtdmd-bench run --method tiny-cps4 --method tiny-teacher --suite my_prompts.txt --metrics brightness "
        "--reference tiny-teacher"
    )


@app.command(help=run_help(run_plan.DEFAULT_RUN))
def run(
    method: list[str] = typer.Option(
        None, "--method", help="Method card name or YAML path (repeatable; default: the toy methods, see above)."
    ),
    suite: str = typer.Option(
        "",
        "--suite",
        help="Suite card name, a prompt file (.txt/.jsonl/.csv/.tsv/.json) or hub:<dataset id> (default: the toy suite, see above).",
    ),
    metrics: str = METRICS,
    reference: str = typer.Option(
        "",
        "--reference",
        help="Method to compare against, paired on the same prompts and seeds (default without --method: the toy reference).",
    ),
    report: Path = typer.Option(
        None,
        "--report",
        help="Leaderboard path (default: the toy report path for the default run, else <out>/<suite>_leaderboard.md).",
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Root of the run directories <out>/<method>/<suite>/ (default: bench_runs)."
    ),
    claims: str = typer.Option(
        "", "--claims", help="Claim card (name in bench/cards/claims/ or a YAML path) to check in the report."
    ),
    prompts_dir: Path = PROMPTS_DIR,
    seeds: str = SEEDS,  # parse_seeds turns the text into a tuple of ints
    limit: int = LIMIT,
    images_per_prompt: int = IPP,
    device: str = DEVICE,
    html: bool = HTML,
    compile: bool = COMPILE,
) -> None:
    """Generate, score, aggregate and report (help text: :func:`run_help`): :func:`bench.pipeline.run_pipeline`."""
    from bench import pipeline  # torch and the models: loaded when a command runs, not for --help

    with clean_errors():
        plan = run_plan.resolve_run(method, suite, metrics, reference, out, report, claims)
        pipeline.run_pipeline(
            plan,
            prompts_dir=prompts_dir,
            seeds=seeds,
            limit=limit,
            images_per_prompt=images_per_prompt,
            device=device,
            html=html,
            compile=compile,
            progress=Bar,
            log=say,
        )


@app.command()
def generate(
    method: str = typer.Option(..., "--method", help="Method card name or YAML path."),
    suite: str = typer.Option(..., "--suite", help="Suite card name, prompt file or hub:<dataset id>."),
    out: Path = OUT,
    prompts_dir: Path = PROMPTS_DIR,
    seeds: str = SEEDS,  # parse_seeds turns the text into a tuple of ints
    limit: int = LIMIT,
    images_per_prompt: int = IPP,
    device: str = DEVICE,
    compile: bool = COMPILE,
) -> None:
    """Images + manifest.jsonl for one (method, suite); a rerun regenerates only missing or corrupt images.

    Example: torchrun --nproc_per_node 8 -m bench.cli generate --method rtdmd-sd35m --suite drawbench
    """
    from bench import pipeline  # torch and the models: loaded when a command runs, not for --help

    with clean_errors():
        loaded = pipeline.load_suite(suite, prompts_dir, images_per_prompt=images_per_prompt)
        pipeline.writable(out)
        card = pipeline.compiled(pipeline.load_method(method)) if compile else pipeline.load_method(method)
        pipeline.generate_run(card, loaded, out, seeds, limit, images_per_prompt, device, progress=Bar, log=say)


@app.command()
def score(
    run_dir: Path = typer.Argument(..., help="A run directory <out>/<method>/<suite>."),
    metrics: str = typer.Option(..., "--metrics", "-m", help="Comma-separated metric names."),
    device: str = DEVICE,
) -> None:
    """Score a run's images; cached by (image sha256, prompt, metric, metric version).

    Example: rtdmd-bench score bench_runs/tiny-cps4/drawbench --metrics brightness
    """
    from bench import pipeline  # torch and the models: loaded when a command runs, not for --help

    with clean_errors():
        say(pipeline.score_run(run_dir, [m.strip() for m in metrics.split(",") if m.strip()], device, progress=Bar))


@app.command()
def aggregate(
    run_dir: Path = typer.Argument(..., help="A run directory <out>/<method>/<suite>."),
    reference: str = typer.Option(
        "", "--reference", help="Method name whose run on the same suite is the paired reference."
    ),
) -> None:
    """summary.json: means with bootstrap intervals, per-category breakdowns, paired differences.

    Example: rtdmd-bench aggregate bench_runs/tiny-cps4/drawbench --reference tiny-teacher
    """
    from bench import pipeline  # torch and the models: loaded when a command runs, not for --help

    with clean_errors():
        summary = pipeline.aggregate_stage(run_dir, reference)
        for name, m in summary["metrics"].items():
            spread = f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]" if m["ci95"] else f"({m['note']})"
            console.print(f"{name}: {m['value']:.4f} {spread} over {m['n_prompts']} prompts")


@app.command()
def report(
    summaries: list[Path] = typer.Argument(..., help="summary.json files (any number of methods and suites)."),
    out: Path = typer.Option(
        Path("reports/leaderboard.md"), "--out", "-o", help="Markdown path; .json and .png go beside it."
    ),
    published: str = typer.Option(
        "", "--published", help="Comma-separated method cards to add as published-numbers rows."
    ),
    claims: str = typer.Option("", "--claims", help="Claim card (name or YAML path) to check against the summaries."),
    html: bool = HTML,
) -> None:
    """A markdown leaderboard (+ JSON + image grid, and with --html a browsable page) from summary files only.

    Example: rtdmd-bench report bench_runs/*/drawbench/summary.json --out reports/drawbench.md --published gdmd-sd3m
    """
    from bench import pipeline  # torch and the models: loaded when a command runs, not for --help

    with clean_errors():
        cards = [pipeline.load_method(m.strip()) for m in published.split(",") if m.strip()]
        pipeline.writable(out.parent)
        pipeline.report_stage(summaries, out, cards, claims=pipeline.load_claims(claims) if claims else None, html=html)
        console.print(f"leaderboard: {out}" + (f" and {out.with_suffix('.html')}" if html else ""))


suites_app = typer.Typer(
    help="The packaged prompt suites: list them (no subcommand), show one, export one as a Hugging Face dataset folder.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@suites_app.callback()
def suites_list(ctx: typer.Context, as_json: bool = JSON) -> None:
    """List the packaged prompt suites (rows, images per prompt, licence, default metrics)."""
    if ctx.invoked_subcommand is not None:
        return
    from rtdmd.config import to_dict
    from rtdmd.suites import card_names, load_card

    with clean_errors():
        cards = [load_card(n) for n in card_names()]
        if as_json:
            console.print_json(data=[to_dict(c) for c in cards])
            return
        table = Table(title="prompt suites (`rtdmd-bench suites show NAME` for one)")
        table.add_column("name", no_wrap=True)
        for col in ("prompts", "images/prompt", "licence", "redistribute", "default metrics"):
            table.add_column(col)
        for c in cards:
            metrics = ", ".join(c.default_metrics) + (" (stand-in: see its card)" if c.metric_note else "")
            table.add_row(
                c.name, str(c.rows), str(c.images_per_prompt), c.licence, "yes" if c.redistribute else "no", metrics
            )
        console.print(table)


@suites_app.command("show")
def suites_show(name: str = typer.Argument(..., help="Suite card name."), prompts_dir: Path = PROMPTS_DIR) -> None:
    """One suite's card, and whether its prompts are available here (sha256 verified)."""
    from rtdmd.config import dump_yaml
    from rtdmd.suites import load_card, load_suite

    with clean_errors():
        console.print(dump_yaml(load_card(name)), markup=False, highlight=False)
        try:
            load_suite(name, prompts_dir, download=False)
            console.print("available locally: yes (sha256 verified)")
        except Exception as error:  # noqa: BLE001 - shown to the user as is
            console.print(f"available locally: no ({error})", markup=False)


@suites_app.command("export")
def suites_export(
    name: str = typer.Argument(..., help="Suite card name."),
    out: Path = typer.Argument(..., help="Folder to write (README.md dataset card, data/<split>.jsonl, LICENSE)."),
    prompts_dir: Path = PROMPTS_DIR,
    push_to_hub: str = typer.Option(
        "", "--push-to-hub", help="Also upload the folder as this Hub dataset repo (owner/name; needs a token)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo private."),
) -> None:
    """Write a suite as a Hugging Face dataset folder that `datasets.load_dataset(OUT)` and the harness read offline.

    A suite whose licence forbids redistribution (DrawBench, HPSv3 subset, HPDv2) gets its card only.

    Example: rtdmd-bench suites export geneval prompts/geneval --prompts-dir ../shared/prompts
    """
    from rtdmd.suite_export import check_push, export_suite
    from rtdmd.suite_export import push_to_hub as push
    from rtdmd.suites import load_card

    with clean_errors():
        card = load_card(name)
        if push_to_hub:
            check_push(card)  # refuses before anything is written
        for path in export_suite(card, out, prompts_dir):
            console.print(f"wrote {path}")
        if push_to_hub:
            console.print(f"pushed: {push(card, out, push_to_hub, private)}")


@app.command("build-dpg")
def build_dpg_command(
    prompt_dir: Path = typer.Argument(..., help="ELLA's dpg_bench/prompts directory (1065 .txt files)."),
    prompts_dir: Path = typer.Option(
        None, "--prompts-dir", help="Where to write dpg_bench/prompts.jsonl (default: the download cache)."
    ),
) -> None:
    """Build DPG-Bench's prompt file from an ELLA checkout and verify it against the card's sha256.

    Example: git clone https://github.com/TencentQQGYLab/ELLA && rtdmd-bench build-dpg ELLA/dpg_bench/prompts
    """
    from rtdmd.files import write_bytes_atomic
    from rtdmd.suites import CACHE, SuiteError, build_dpg, load_card, sha256_bytes

    with clean_errors():
        data = build_dpg(prompt_dir)
        entry = load_card("dpg_bench").files[0]
        if sha256_bytes(data) != entry.sha256:
            raise SuiteError(
                f"built file has sha256 {sha256_bytes(data)}, the card expects {entry.sha256}: is {prompt_dir} ELLA's dpg_bench/prompts?"
            )
        target = write_bytes_atomic((prompts_dir or CACHE) / entry.path, data)
        console.print(f"wrote {target} (sha256 verified)")


@app.command()
def metrics(as_json: bool = JSON) -> None:
    """Every registered metric: direction, version, units, how it is averaged, what each prompt must carry,
    whether it is differentiable (a stage-2 reward), and the weights it downloads (`rtdmd-bench weights list`)."""
    from rtdmd.rewards import metric_listing

    with clean_errors():
        rows = metric_listing()
        if as_json:
            console.print_json(data=rows)
            return
        table = Table(title="metrics (--json adds units, weight sources and a description)")
        for col in ("name", "better", "aggregate", "needs", "differentiable", "downloads", "version"):
            table.add_column(col, overflow="fold", no_wrap=col == "name")
        for r in rows:
            table.add_row(
                r["name"],
                "higher" if r["higher_is_better"] else "lower",
                r["aggregate"],
                ", ".join(r["needs"]) or "–",
                "yes" if r["differentiable"] else "no",
                f"{len(r['weights'])} file set(s)" if r["weights"] else "–",
                r["version"],
            )
        console.print(table)


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="A run folder <out>/<method>/<suite>."),
    run_b: Path = typer.Argument(..., help="The run folder to compare against (any --out, any date)."),
    metrics: str = typer.Option("", "--metrics", "-m", help="Comma-separated metrics (default: all scored in both)."),
    as_json: bool = JSON,
) -> None:
    """Paired differences A - B per metric, matched by prompt, run seed and sample index; runs holding
    different images are refused. Same interval and p-value as the leaderboard's paired column, Holm-adjusted
    over the metrics compared.

    Example: rtdmd-bench compare runs_dec/rtdmd-sd35m/drawbench runs_nov/rtdmd-sd35m/drawbench
    """
    from bench.compare import compare_runs

    with clean_errors():
        result = compare_runs(run_a, run_b, [m.strip() for m in metrics.split(",") if m.strip()] or None)
        if as_json:
            console.print_json(data=result)
            return
        table = Table(
            title=f"{run_a} - {run_b}: {result['suite']}, {result['prompts']} prompts, {result['images']} images each"
        )
        for col in ("metric", "A", "B", "A - B", "95% interval", "p (Holm)"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for name, r in result["metrics"].items():
            p = f"<{r['p_floor']:.1e}" if r["p_value"] <= r["p_floor"] else f"{r['p_holm']:.3g}"
            better = (
                "" if r["diff"] == 0 else " (A better)" if (r["diff"] > 0) == r["higher_is_better"] else " (B better)"
            )
            table.add_row(
                name,
                f"{r['a']:.4f}",
                f"{r['b']:.4f}",
                f"{r['diff']:+.4f}{better}",
                f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
                p,
            )
        console.print(table)
        for note in result["notes"]:
            say(f"note: {note}")


@app.command("import")
def import_images(
    folder: Path = typer.Argument(
        ..., help="Images by prompt: GenEval's <index>/samples/<k>.png, or <prompt_id>_<k>.png."
    ),
    suite: str = typer.Option(..., "--suite", help="The suite the images were made from (card name or prompt file)."),
    method: str = typer.Option(
        ...,
        "--method",
        help="A label for the images (or a method card name, whose display name and sampler are shown).",
    ),
    out: Path = OUT,
    prompts_dir: Path = PROMPTS_DIR,
    seed: int = typer.Option(0, "--seed", min=0, help="The run seed to file the images under."),
    limit: int = LIMIT,
) -> None:
    """Make a run folder from images made by other code, checked against the suite, so that `score`,
    `aggregate`, `report` and `compare` work on them as on generated runs (images are hard-linked where possible).

    Example: rtdmd-bench import ~/geneval_outputs --suite geneval --method my-model && \
    rtdmd-bench score bench_runs/my-model/geneval --metrics geneval
    """
    from bench import pipeline
    from bench.importer import import_stage

    with clean_errors():
        loaded = pipeline.load_suite(suite, prompts_dir)
        pipeline.writable(out)
        result = import_stage(folder, loaded, out, method, seed, limit)
        console.print(
            f"{result['run_dir']}: {result['images']} images ({result['prompts']} prompts x {result['images_per_prompt']}, "
            f"{result['layout']} layout) imported; next: rtdmd-bench score {result['run_dir']} --metrics ..."
        )


@app.command()
def methods(name: str = typer.Argument("", help="Show one method card."), as_json: bool = JSON) -> None:
    """List the packaged method cards, or show one."""
    from bench.methods import card_names, load_method
    from rtdmd.config import dump_yaml, to_dict

    with clean_errors():
        if as_json:
            cards = [load_method(name)] if name else [load_method(n) for n in card_names()]
            console.print_json(data=[to_dict(c) | {"fingerprint": c.fingerprint()} for c in cards])
            return
        if name:
            console.print(dump_yaml(load_method(name)), markup=False, highlight=False)
            return
        table = Table(title="method cards")
        table.add_column("name", no_wrap=True)
        for col in ("family", "steps", "eta", "guidance", "resolution", "weights"):
            table.add_column(col)
        for n in card_names():
            c = load_method(n)
            table.add_row(
                n,
                c.backbone.family if c.backbone else "–",
                str(c.sampler.num_steps),
                str(c.sampler.eta),
                str(c.sampler.guidance),
                f"{c.height}x{c.width}",
                "yes" if c.runnable else "published only",
            )
        console.print(table)


@app.command()
def schedules(
    steps: int = typer.Option(4, "--steps", "-n", min=1, help="Number of sampling steps."),
    resolution: list[int] = typer.Option(
        [512, 1024], "--resolution", "-r", min=16, help="Square image sizes in pixels (repeatable)."
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
    spacing = "pipeline default spacing" if default_spacing else "RTDMD raw times 1000/750/500/250"
    table = Table(title=f"sigma schedules, {steps} steps, {spacing}")
    table.add_column("family")
    table.add_column("resolution", justify="right")
    table.add_column("sigmas (terminal 0 appended)")
    for family in BACKBONES:
        for res in resolution:
            sigmas = reference_schedule(BACKBONES.get(family), steps, res, res, timesteps)
            table.add_row(family, str(res), ", ".join(f"{s:.4f}" for s in sigmas.tolist()))
    console.print(table)


app.add_typer(weights_app, name="weights")
app.add_typer(suites_app, name="suites")


def main() -> None:
    with clean_errors():
        app(prog_name="rtdmd-bench")


if __name__ == "__main__":
    sys.exit(main())
