"""``rtdmd-train``: the trainer's command line.

rtdmd-train sample --config tiny                      # rtdmd/configs/sample/tiny.yaml
rtdmd-train sample --config my.yaml sampler.eta=0.0   # any YAML path, typed key=value overrides
rtdmd-train sample --config tiny --dry-run            # print the resolved config and exit

Each command imports its trainer when it runs (the only function-local imports of the package, with
``bench/cli.py``'s): the trainers load torch, diffusers and peft, and ``--help``, ``configs`` and a
bad argument should answer at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rtdmd.config import dump_yaml, load, packaged_names
from rtdmd.errors import one_line_errors

app = typer.Typer(
    help="RTDMD reference trainer. Every command takes --config (a packaged name or a YAML path), then key=value overrides.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

CONFIG_HELP = "Packaged config name (e.g. 'tiny') or a path to a YAML file."
OVERRIDES_HELP = "Typed overrides, e.g. sampler.eta=0.0 images_per_prompt=2 backbone.dtype=bfloat16."


def _load(schema, group: str, config: str, overrides: list[str] | None, dry_run: bool = False):
    """The resolved config; with ``dry_run`` print it and exit. Config errors exit 2 with one line."""
    with _config_errors():
        cfg = load(schema, config, overrides or [], group=group)
    if dry_run:
        console.print(dump_yaml(cfg), end="", markup=False, highlight=False, soft_wrap=True)
        if getattr(cfg, "prompt_file", ""):  # resolve the training prompts too: a bad source fails here, not on a GPU
            from rtdmd.data import read_prompt_records

            with _config_errors():  # a wrong sha256, an unknown generator, a broken file: one line, exit 2
                try:
                    records = read_prompt_records(cfg.prompt_file, cfg.prompt_file_sha256)
                except FileNotFoundError as error:  # a file the user fetches later: say so, the config is fine
                    console.print(
                        f"# training prompts not checked: {error} (a run would stop here)", markup=False, soft_wrap=True
                    )
                    raise typer.Exit(0) from None
            checked = ", sha256 verified" if cfg.prompt_file_sha256 else ", no sha256 pinned"
            console.print(f"# {len(records)} training prompts from {cfg.prompt_file}{checked}", markup=False)
        raise typer.Exit(0)
    return cfg


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """A failure of input, environment or a fault (a bad config, a run directory holding another one,
    a missing GPU, a full disk) prints one line and exits 2 (:mod:`rtdmd.errors`)."""
    with one_line_errors(lambda line: err.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)):
        yield


class _LazyBar:
    """A progress bar that appears with the first update (so early errors print cleanly)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Progress | None = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=True,  # the summary table follows; an error stays the one line printed
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __enter__(self) -> _LazyBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
def sample(
    config: str = typer.Option("tiny", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config and exit without loading weights."
    ),
) -> None:
    """Generate images with a backbone and sampler spec into a resumable run directory.

    Packaged configs: see `rtdmd-train configs`. Rerunning the same command resumes (finished
    images are kept); a different config for the same run_dir is refused.
    """
    from rtdmd.train.sample import SampleConfig, run

    cfg = _load(SampleConfig, "sample", config, overrides, dry_run)
    with _LazyBar("sampling") as bar, _config_errors():
        summary = run(cfg, progress=bar.update)
    table = Table(
        title=f"{cfg.backbone.family} · {cfg.sampler.num_steps} steps · eta {cfg.sampler.eta} · guidance {cfg.sampler.guidance}"
    )
    for col in ("prompt", "k", "init seed", "mean pixel", "png sha256"):
        table.add_column(col, overflow="fold")
    for row in summary["rows"]:
        table.add_row(
            row["prompt"],
            str(row["sample_index"]),
            str(row["init_seed"]),
            f"{row['mean_pixel']:.4f}",
            row["sha256"][:12],
        )
    console.print(table)
    nfe = summary["nfe_per_image"]
    console.print(
        f"{summary['generated']} generated, {summary['skipped']} already done · device {summary['device']} · "
        f"load {summary['load_seconds']:.1f}s · sampling {summary['generate_seconds']:.2f}s · "
        f"measured NFE/image {'-' if nfe is None else f'{nfe:g}'}\n"
        f"run directory: {summary['run_dir']} (grid.png, samples.jsonl, config.yaml, env.json)"
    )


@app.command()
def distill(
    config: str = typer.Option("tiny", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(
        None, help="Typed overrides, e.g. steps=100 batch_size=8 ac.consistency_weight=0.", show_default=False
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config and exit without loading weights."
    ),
) -> None:
    """Stage 1: AC-DMD (or plain DMD with `method: dmd`) distillation of a teacher into a few-step generator.

    Packaged configs: tiny, sd3m, sd35m, flux2_4b, flux2_9b, flux1_dev (see `rtdmd-train configs`).
    Rerunning the same command resumes from the last checkpoint in run_dir; raising `steps=`
    extends a finished run. Multi-GPU: `torchrun --nproc_per_node N -m rtdmd.train.cli distill ...`.
    """
    from rtdmd.train.distill import train
    from rtdmd.train.distill_config import DistillConfig

    cfg = _load(DistillConfig, "distill", config, overrides, dry_run)
    with _config_errors():
        summary = train(cfg)
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"steps {summary['start_step']} -> {summary['steps']} in {summary['seconds']:.1f}s on {summary['world_size']} process(es) · "
            f"run directory: {summary['run_dir']} (stats.jsonl, checkpoints/, eval/)"
        )


@app.command()
def rl(
    config: str = typer.Option("tiny", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(
        None,
        help="Typed overrides, e.g. epochs=20 arm=no-bp grpo.log_prob=simplified grpo.clip_range=1e-5.",
        show_default=False,
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config and exit without loading weights."
    ),
) -> None:
    """Stage 2: RTDMD reward fine-tuning of a stage-1 generator (SubGRPO + reward back-propagation + AC-DMD).

    Packaged configs: tiny, toy, sd3m, sd35m, flux2_4b, flux2_9b, flux1_dev (see `rtdmd-train configs`).

    Start from stage 1 with stage1.run=<rtdmd-train distill run>, or with stage1.generator_lora= and stage1.fake_lora= (exported LoRA files).

    Ablations are one switch: arm=rtdmd | grpo-all-steps | no-bp | no-dm | bp-only | dmd-only.

    Rerunning the same command resumes from the last checkpoint; raising epochs= extends a finished run. Multi-GPU: torchrun --nproc_per_node N -m rtdmd.train.cli rl ...
    """
    from rtdmd.train.rl import train
    from rtdmd.train.rl_config import RLConfig

    cfg = _load(RLConfig, "rl", config, overrides, dry_run)
    with _config_errors():
        summary = train(cfg)
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"epochs {summary['start_epoch']} -> {summary['epochs']} in {summary['seconds']:.1f}s on "
            f"{summary['world_size']} process(es) · run directory: {summary['run_dir']} (stats.jsonl, checkpoints/, eval/)"
        )


@app.command()
def pretrain(
    config: str = typer.Option("toy", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(
        None, help="Typed overrides, e.g. steps=2000 batch_size=64 device=cpu precision=float32.", show_default=False
    ),
    export: str = typer.Option(
        "", "--export", help="Where to write the EMA teacher (default <run_dir>/toy_teacher.safetensors)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Train the toy teacher (flow matching on the rendered toy world, caption dropout for CFG).

    One GPU trains `--config toy` in minutes; a CPU runs the same recipe slowly (see the config's
    header for small settings). Rerunning resumes from the last checkpoint; at the end the EMA
    weights are sampled on the toy-geneval prompts, scored, and written as float16 safetensors.
    """
    from rtdmd.train.pretrain import PretrainConfig, train

    cfg = _load(PretrainConfig, "pretrain", config, overrides, dry_run)
    with _config_errors():
        summary = train(cfg, export=export or None)
    console.print(
        f"pretrain: steps {summary['start_step']} -> {summary['steps']} · render {summary['render_s']}s · "
        f"train {summary['train_s']}s on {summary['device']} · final {summary['final']} · weights {summary['weights']}"
    )


def _train_and_print(command: str, schema, train, config: str, overrides: list[str] | None, dry_run: bool) -> None:
    """Load ``command``'s config (group: the command with ``_``), train, print the summary."""
    cfg = _load(schema, command.replace("-", "_"), config, overrides, dry_run)
    with _config_errors():
        summary = train(cfg)
    console.print(f"{command}: {summary}")


@app.command("pretrain-clip")
def pretrain_clip(
    config: str = typer.Option("toy", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="Typed overrides, e.g. steps=200 device=cpu.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Train toy-clip, the contrastive image-text model behind the toy-clip and toy-fd metrics."""
    from rtdmd.train.pretrain_clip import ToyClipConfig, train

    _train_and_print("pretrain-clip", ToyClipConfig, train, config, overrides, dry_run)


@app.command("pretrain-recognizer")
def pretrain_recognizer(
    config: str = typer.Option("toy", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(
        None, help="Typed overrides, e.g. num_scenes=2000 epochs=1.", show_default=False
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Train the toy detector's recogniser (8 shapes + reject, temperature-calibrated) on the CPU."""
    from rtdmd.train.pretrain_recognizer import RecognizerConfig, train

    _train_and_print("pretrain-recognizer", RecognizerConfig, train, config, overrides, dry_run)


@app.command("export-lora")
def export_lora(
    run: str = typer.Argument(..., help="A finished `rtdmd-train distill` run directory."),
    out: str = typer.Option(..., "--out", "-o", help="The .safetensors file to write."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Export an unfinished run's last checkpoint (its step goes into the metadata)."
    ),
) -> None:
    """Write a run's EMA generator LoRA (latest checkpoint) as one small peft-named safetensors file.

    Bench method cards load it with `loras: [{kind: state_dict, source: FILE}]` (rank and alpha are
    in the file's metadata), or, once shipped in the package, with `kind: shipped`.
    """
    from rtdmd.backbones.base import TORCH_DTYPES
    from rtdmd.train.run_lora import export_generator_lora

    if dtype not in TORCH_DTYPES:
        err.print(f"[bold red]error:[/] --dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
        raise typer.Exit(2)
    try:
        path = export_generator_lora(run, out, TORCH_DTYPES[dtype], allow_partial=allow_partial)
    except (FileNotFoundError, ValueError) as error:
        err.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


@app.command()
def plot(
    run: Path = typer.Argument(..., help="A training run directory (its stats.jsonl)."),
    out: Path = typer.Option(None, "--out", "-o", help="PNG to write (default: <run>/stats.png)."),
) -> None:
    """Losses, rewards, gradient norms, evaluation metrics and time per step against step, as one PNG.

    Example: rtdmd-train plot runs/distill && open runs/distill/stats.png
    """
    from rtdmd.train.plot import plot_run

    with _config_errors():
        console.print(f"wrote {plot_run(run, out)}")


@app.command()
def configs() -> None:
    """List the packaged configs."""
    for group in ("sample", "pretrain", "pretrain_clip", "pretrain_recognizer", "distill", "rl"):
        for name in packaged_names(group):
            console.print(name)


def main() -> None:
    with _config_errors():
        app(prog_name="rtdmd-train")


if __name__ == "__main__":
    sys.exit(main())
