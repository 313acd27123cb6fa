"""``rtdmd-train plot RUN``: a run's ``stats.jsonl`` as one PNG of panels against step (matplotlib).

Panels, where the run logged them: losses (``loss/*``), rewards (``reward/*``), gradient norms
(``train/grad_norm*``), evaluation metrics (``eval/<suite>/<metric>``, without the per-category keys),
PPO diagnostics (``ppo/*``) and time per step. A value that is not a finite number (logged as text) is
left out of its line, never drawn as 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from rtdmd.errors import RtdmdError
from rtdmd.files import read_jsonl, save_image_atomic

PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss/"),
    ("reward", "reward/"),
    ("gradient norm", "train/grad_norm"),
    ("evaluation", "eval/"),
    ("PPO", "ppo/"),
    ("seconds per step", "time/"),
)


class PlotError(RtdmdError, ValueError):
    """A run folder without anything to plot."""


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` of every finite numeric value of the rows."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for row in rows:
        for key, value in row.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out[key][0].append(int(row["step"]))
                out[key][1].append(float(value))
    return dict(out)


def panel_keys(keys: list[str]) -> list[tuple[str, list[str]]]:
    """The panels that have data, each with its keys (eval: ``eval/<suite>/<metric>`` only)."""
    panels = []
    for title, prefix in PANELS:
        chosen = [k for k in sorted(keys) if k.startswith(prefix)]
        if prefix == "eval/":
            chosen = [k for k in chosen if k.count("/") <= 2]
        if chosen:
            panels.append((title, chosen))
    return panels


def plot_run(run: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``<run>/stats.png``); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file, on any machine
    import matplotlib.pyplot as plt

    run = Path(run)
    rows = read_jsonl(run / "stats.jsonl", bad="skip")
    data = series(rows)
    panels = panel_keys(list(data))
    if not panels:
        raise PlotError(f"{run / 'stats.jsonl'} holds no losses, rewards or metrics to plot (is {run} a training run?)")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            steps, values = data[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{run.name}: {len(rows)} logged steps", fontsize=11)
    fig.tight_layout()
    fig.canvas.draw()
    image = fig.canvas.buffer_rgba()
    from PIL import Image

    picture = Image.frombuffer("RGBA", fig.canvas.get_width_height(), image, "raw", "RGBA", 0, 1).convert("RGB")
    plt.close(fig)
    target = Path(out) if out else run / "stats.png"
    save_image_atomic(picture, target)
    return target
