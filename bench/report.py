"""Harness stage ``report``: ``summary.json`` files -> a markdown leaderboard, a PNG grid, JSON.

Rendered from the summaries alone (every number traces back to scores and images on disk). One
table per suite: a column per metric with its direction, version and units in the header, best in
bold and second underlined, the 95% interval beside each value, the measured NFE, published numbers
beside reproduced ones where a card has them, and a dagger on cells whose metric the method was
trained on. Paired differences against the reference method get their own table, their p-values
adjusted by Holm's method over every comparison in the report. Set metrics (one value per run, e.g.
a Fréchet distance) show their value without an interval; every ``category_mean`` metric (GenEval's
task-averaged score) gets a per-category table, GenEval-style; runs of several seeds get a table of
their per-seed values. Rows are labelled by what tells them apart: two runs of one method show
their seeds (or their run directories).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from bench.claim_stats import significance
from bench.claims import check, claims_section
from bench.gallery import html_page
from bench.methods import MethodCard
from bench.runfiles import read_manifest, read_summary
from rtdmd.config import to_dict
from rtdmd.errors import RtdmdError, kill_point
from rtdmd.files import save_image_atomic, write_text_atomic
from rtdmd.stats import N_BOOT, holm

# leaderboard.json layout: raise on any change a reader must know about (docs/harness.md lists the keys)
SCHEMA_VERSION = 1
GRID_PROMPTS = 6
GRID_CELL = 128


class ReportError(RtdmdError, ValueError):
    """Summaries that cannot make a report."""


def fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"


def fmt_nfe(nfe: float | list[float] | None) -> str:
    """Measured forward passes per image; several values if the chunks differed; "–" for imported images."""
    values = nfe if isinstance(nfe, list) else [nfe]
    return "/".join("–" if v is None else f"{v:g}" for v in values)


def fmt_p(d: dict, adjusted: float) -> str:
    """The Holm-adjusted p-value; where no resample reached the observed difference (the raw p-value
    is the floor ``1 / (n_boot + 1)``) it is only bounded: ``p<`` the adjusted floor, rounded up."""
    if d["p_value"] > d["p_floor"]:
        return f"p={adjusted:.3g}"
    exponent = math.floor(math.log10(adjusted))
    scale = 10.0 ** (1 - exponent)
    mantissa, power = f"{math.ceil(adjusted * scale - 1e-9) / scale:.1e}".split("e")
    return f"p<{mantissa.rstrip('0').rstrip('.')}e{int(power)}"


def ranks(values: dict[int, float], higher_is_better: bool) -> dict[int, int]:
    """Rank of each row (0 = best) for bold/underline; ties share a rank."""
    ordered = sorted(set(values.values()), reverse=higher_is_better)
    return {row: ordered.index(v) for row, v in values.items()}


def row_labels(summaries: list[dict]) -> list[str]:
    """Each summary's label: its method's display name, and where two rows would read the same, what
    tells them apart: the method's name, else the run seeds, else the run directory."""
    labels = [s["method"]["display"] for s in summaries]
    for attribute in (
        lambda s: s["method"]["name"],
        lambda s: f"seed{'s' * (len(s['seeds']) > 1)} {','.join(map(str, s['seeds']))}",
        lambda s: s["run_dir"],
    ):
        for label in {x for x in labels if labels.count(x) > 1}:
            rows = [i for i, x in enumerate(labels) if x == label]
            if len({attribute(summaries[i]) for i in rows}) > 1:
                for i in rows:
                    labels[i] = f"{label} ({attribute(summaries[i])})"
    return labels


def arrow(entry: dict) -> str:
    return "↑" if entry["higher_is_better"] else "↓"


def marked(text: str, rank: int | None) -> str:
    """Best in bold, second underlined."""
    return f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text


def value_text(entry: dict) -> str:
    """The value with its 95% interval; a set metric has one value per run and no interval."""
    if entry["ci95"] is None:
        return fmt(entry["value"])
    return f"{fmt(entry['value'])} [{fmt(entry['ci95'][0])}, {fmt(entry['ci95'][1])}]"


def published_rows(cards: list[MethodCard], suite: str, present: set[str]) -> list[dict]:
    """Rows for methods known only by published numbers on this suite."""
    rows = []
    for card in cards:
        for pub in card.published:
            if pub.suite == suite and card.name not in present:
                rows.append(
                    {
                        "name": card.name,
                        "display": card.display or card.name,
                        "published": pub,
                        "trained_on": card.trained_on,
                    }
                )
    return rows


def suite_table(
    summaries: list[dict], extra: list[dict], p_adjusted: dict[tuple[int, str], float]
) -> tuple[list[str], dict]:
    """One suite's tables; ``p_adjusted[(id(summary), metric)]``: the Holm-adjusted p-values."""
    suite = summaries[0]["suite"]
    labels = row_labels(summaries)
    metrics = sorted({m for s in summaries for m in s["metrics"]})
    info = {m: next(s["metrics"][m] for s in summaries if m in s["metrics"]) for m in metrics}
    head = ["Method", "NFE"] + [
        f"{m} {arrow(info[m])} (v{info[m]['version']}, {info[m]['units'] or 'native units'})" for m in metrics
    ]
    lines = [
        f"## {suite['name']}",
        "",
        f"Suite version {suite['version']}, sha256 `{suite['sha256'][:16]}`, {suite['prompts']} prompts × "
        f"{suite['images_per_prompt']} images × {seeds_text(summaries)}.",
        *(["", f"Metrics: {suite['metric_note']}"] if suite.get("metric_note") else []),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    by_metric_rank = {
        m: ranks(
            {i: s["metrics"][m]["value"] for i, s in enumerate(summaries) if m in s["metrics"]},
            info[m]["higher_is_better"],
        )
        for m in metrics
    }
    table = {
        "suite": suite,
        "metrics": {m: {k: info[m][k] for k in ("version", "units", "higher_is_better", "aggregate")} for m in metrics},
        "rows": [],
    }
    for i, (s, label) in enumerate(zip(summaries, labels, strict=True)):
        method = s["method"]
        pub = {k: v for p in method["published"] for k, v in p["scores"].items()}
        cells = [label, fmt_nfe(s["nfe"])]
        row = {"method": method["name"], "label": label, "seeds": s["seeds"], "nfe": s["nfe"], "values": {}}
        for m in metrics:
            if m not in s["metrics"]:
                cells.append("–")
                continue
            entry = s["metrics"][m]
            text = marked(value_text(entry), by_metric_rank[m][i])
            if m in method["trained_on"]:
                text += " †"
            if m in pub:
                text += f" · pub. {fmt(pub[m])}"
            cells.append(text)
            row["values"][m] = {
                "value": entry["value"],
                "ci95": entry["ci95"],
                "per_seed": entry["per_seed"],
                "published": pub.get(m),
            }
            if entry["aggregate"] == "category_mean":
                row["values"][m] |= {"prompt_mean": entry["prompt_mean"], "per_category": entry["per_category"]}
            if "vs_reference" in entry:
                row["values"][m]["vs_reference"] = entry["vs_reference"] | (
                    {"p_holm": p_adjusted[(id(s), m)]} if (id(s), m) in p_adjusted else {}
                )
        lines.append("| " + " | ".join(cells) + " |")
        table["rows"].append(row)
    for p in extra:
        nfe = f"{p['published'].nfe} (stated)" if p["published"].nfe else "–"
        cells = [f"{p['display']} (published)", nfe]
        for m in metrics:
            value = p["published"].scores.get(m)
            cells.append("–" if value is None else f"{fmt(value)}{' †' if m in p['trained_on'] else ''}")
        lines.append("| " + " | ".join(cells) + " |")
        table["rows"].append(
            {
                "method": p["name"],
                "published_only": True,
                "source": p["published"].source,
                "values": dict(p["published"].scores),
            }
        )
    lines += paired_table(summaries, labels, metrics, info, p_adjusted)
    for m in metrics:
        if info[m]["aggregate"] == "category_mean":
            lines += category_table(summaries, labels, m)
    if any(len(s["seeds"]) > 1 for s in summaries):
        lines += seed_table(summaries, labels, metrics, info)
    return lines, table


def seeds_text(summaries: list[dict]) -> str:
    seeds = sorted({tuple(s["seeds"]) for s in summaries})
    counts = sorted({len(x) for x in seeds})
    which = " / ".join(",".join(map(str, x)) for x in seeds)
    return f"{'/'.join(map(str, counts))} seed{'s' * (counts != [1])} ({which})"


def category_table(summaries: list[dict], labels: list[str], metric: str) -> list[str]:
    """GenEval-style per-task table of one ``category_mean`` metric: overall (mean of the category
    means), the plain mean over prompts, then each category in the suite's order."""
    entries = {i: s["metrics"][metric] for i, s in enumerate(summaries) if metric in s["metrics"]}
    first = next(iter(entries.values()))
    categories = list(dict.fromkeys(c for e in entries.values() for c in e["categories"]))
    columns = {"Overall": "value", "Prompt mean": "prompt_mean"} | {c: c for c in categories}
    values = {
        column: {
            i: e[key] if key in ("value", "prompt_mean") else e["per_category"].get(key) for i, e in entries.items()
        }
        for column, key in columns.items()
    }
    rank = {
        column: ranks({i: v for i, v in by_row.items() if v is not None}, first["higher_is_better"])
        for column, by_row in values.items()
    }
    lines = [
        "",
        f"{metric} {arrow(first)} by category (v{first['version']}): Overall is the mean "
        "of the category means, Prompt mean the plain mean over prompts.",
        "",
        "| Method | " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    for i in entries:
        cells = ["–" if values[c][i] is None else marked(fmt(values[c][i]), rank[c].get(i)) for c in columns]
        lines.append(f"| {labels[i]} | " + " | ".join(cells) + " |")
    return lines


def seed_table(summaries: list[dict], labels: list[str], metrics: list[str], info: dict[str, dict]) -> list[str]:
    """Each run seed's own value (the headline over that seed's images), and their spread."""
    lines = [
        "",
        "Per run seed (the same statistic over one seed's images; ± is the standard deviation over seeds):",
        "",
        "| Method | " + " | ".join(f"{m} {arrow(info[m])}" for m in metrics) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|",
    ]
    for s, label in zip(summaries, labels, strict=True):
        cells = []
        for m in metrics:
            per_seed = s["metrics"].get(m, {}).get("per_seed", {})
            values = list(per_seed.values())
            spread = f" ± {fmt(statistics.stdev(values))}" if len(values) > 1 else ""
            cells.append(" / ".join(fmt(v) for v in values) + spread if values else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def paired_table(
    summaries: list[dict],
    labels: list[str],
    metrics: list[str],
    info: dict[str, dict],
    p_adjusted: dict[tuple[int, str], float],
) -> list[str]:
    """Differences against the reference; the header's arrow says which sign is an improvement."""
    compared = [
        (s, label)
        for s, label in zip(summaries, labels, strict=True)
        if any("vs_reference" in e for e in s["metrics"].values())
    ]
    if not compared:
        return []
    reference = next(
        e["vs_reference"]["reference"] for s, _ in compared for e in s["metrics"].values() if "vs_reference" in e
    )
    lines = [
        "",
        f"Paired difference against **{reference}** on the same prompts and seeds "
        "(the difference of the headline values, 95% interval, Holm-adjusted p-value):",
        "",
        "| Method | " + " | ".join(f"{m} {arrow(info[m])}" for m in metrics) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|",
    ]
    for s, label in compared:
        cells = []
        for m in metrics:
            d = s["metrics"].get(m, {}).get("vs_reference")
            if d is None:
                cells.append("–")
            elif d["ci_low"] is None:  # a set metric: one value per run, no interval
                cells.append(f"{d['diff']:+.4f} (set)")
            else:
                p = fmt_p(d, p_adjusted[(id(s), m)])
                cells.append(f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], {p}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def footnotes(summaries: list[dict], n_comparisons: int) -> list[str]:
    prov = summaries[0]["provenance"]
    packages = ", ".join(f"{k} {v}" for k, v in sorted(prov["packages"].items()) if v)
    devices = (
        ", ".join(sorted({d for s in summaries for d in s["provenance"].get("generated_on", [])})) or "unknown devices"
    )
    aggregates = {e["aggregate"] for s in summaries for e in s["metrics"].values()}
    extra = []
    if "category_mean" in aggregates:
        extra.append(
            "Metrics averaged by category (GenEval's overall score) report the mean of the per-category means, and "
            "their intervals and paired tests resample prompts within each category (a stratified bootstrap), so they "
            "describe that same number; their per-category table also gives the plain mean over prompts."
        )
    if "set" in aggregates:
        extra.append(
            "Set metrics score all images of a run seed at once (one value per run seed, averaged over seeds): no "
            'per-prompt interval, and the paired column gives the plain difference of values, marked "(set)".'
        )
    if n_comparisons:
        extra.append(
            f"Paired tests: two-sided p-values of the shifted bootstrap ({N_BOOT:,} resamples), adjusted by Holm's "
            f"method over the {n_comparisons} paired comparisons of this report (family-wise error rate). "
            f'"p<x": no resample reached the observed difference; x is the resampling floor 1/{N_BOOT + 1:,} '
            "after the adjustment."
        )
    seeds = sorted({seed for s in summaries for seed in s["seeds"]})
    return [
        "",
        "Values: each prompt's mean score over its images and run seeds, averaged over prompts. [a, b] is a 95% "
        f"percentile bootstrap interval of the value shown ({N_BOOT:,} resamples). The unit of resampling is the "
        "prompt: a prompt's images (all seeds) share its difficulty, so they are resampled together. **Bold** best, "
        "<u>underlined</u> second. † the method was trained on this metric's reward. "
        '"pub." is the number the method\'s source reports (its own protocol). NFE counts transformer forward passes '
        "per image, measured (classifier-free guidance counts twice).",
        *(line for note in extra for line in ("", note)),
        "",
        "Seeds: image k of prompt p under run seed s has its initial latent and every injected noise drawn from "
        f'seed_for(s, "<suite>/<p>", k, step), run seeds {", ".join(map(str, seeds))}: the same on any batch size, '
        "GPU count or order.",
        "",
        f"Generated by rtdmd {prov['rtdmd_git'][:12]}{' with local changes' if prov.get('rtdmd_dirty') else ''} "
        f"({prov['rtdmd_commit_date']}); {packages}; images generated on {devices}.",
    ]


def grid_prompts(manifest: list[dict], count: int) -> list[str]:
    """Prompt ids for the grid: the first prompt of each category (GenEval's tasks), then the
    following prompts, ``count`` in all."""
    ids = list(dict.fromkeys(r["prompt_id"] for r in manifest))
    first = list({r["category"]: r["prompt_id"] for r in reversed(manifest)}.values())[::-1]
    return list(dict.fromkeys(first + ids))[:count]


def image_grid(summaries: list[dict], path: Path) -> None:
    """Image 0 of the first run seed of a few prompts (one per category first) for every row of the
    first suite: one row per run, the prompts written above their column."""
    import textwrap

    manifests = [
        [r for r in read_manifest(Path(s["run_dir"])) if r["sample_index"] == 0 and r["seed"] == s["seeds"][0]]
        for s in summaries
    ]
    chosen = grid_prompts(manifests[0], GRID_PROMPTS)
    header, label_w = 44, 160
    canvas = Image.new("RGB", (label_w + GRID_CELL * len(chosen), header + GRID_CELL * len(summaries)), "white")
    draw = ImageDraw.Draw(canvas)
    prompts = {r["prompt_id"]: r["prompt"] for r in manifests[0]}
    for j, prompt_id in enumerate(chosen):
        draw.multiline_text((label_w + j * GRID_CELL + 2, 2), textwrap.fill(prompts[prompt_id], 21)[:90], fill="black")
    for i, (s, label, manifest) in enumerate(zip(summaries, row_labels(summaries), manifests, strict=True)):
        top = header + i * GRID_CELL
        draw.multiline_text((4, top + GRID_CELL // 2 - 12), textwrap.fill(label, 26), fill="black")
        files = {r["prompt_id"]: Path(s["run_dir"]) / r["file"] for r in manifest}
        for j, prompt_id in enumerate(chosen):
            if prompt_id in files:
                image = Image.open(files[prompt_id]).convert("RGB")
                canvas.paste(
                    image.resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS), (label_w + j * GRID_CELL, top)
                )
    save_image_atomic(canvas, path)


def holm_family(summaries: list[dict]) -> dict[tuple[int, str], float]:
    """Holm-adjusted p-values of every paired comparison (method, metric) in the report."""
    family = [
        (id(s), m, e["vs_reference"]["p_value"])
        for s in summaries
        for m, e in sorted(s["metrics"].items())
        if e.get("vs_reference", {}).get("p_value") is not None
    ]
    adjusted = holm([p for _, _, p in family])
    return {(key, m): a for (key, m, _), a in zip(family, adjusted, strict=True)}


def report_stage(
    summary_paths: list[Path], out: Path, published: list[MethodCard] = (), claims=None, html: bool = False
) -> dict:
    """Write the leaderboard (markdown, JSON, image grid; with ``html`` also the browsable page of
    :mod:`bench.gallery`); ``claims``: a :class:`bench.claims.ClaimCard` whose claims are checked against
    these summaries and stated after the tables."""
    summaries = [read_summary(Path(p)) for p in summary_paths]
    if not summaries:
        raise ReportError("no summary.json files given")
    for path, s in zip(summary_paths, summaries, strict=True):
        if "seeds" not in s:
            raise ReportError(f"{path} was written by an older rtdmd: run `rtdmd-bench aggregate` on its run again")
    by_suite: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        by_suite[(s["suite"]["name"], s["suite"]["version"], s["suite"]["sha256"])].append(s)
    p_adjusted = holm_family(summaries)
    lines, tables = ["# Leaderboard", ""], []
    for group in by_suite.values():
        present = {s["method"]["name"] for s in group}
        extra = published_rows(list(published), group[0]["suite"]["name"], present)
        block, table = suite_table(group, extra, p_adjusted)
        lines += block + [""]
        tables.append(table)
    checked = []
    if claims is not None:
        checked = significance(claims, check(claims, summaries), summaries)
        lines += [*claims_section(claims, checked), ""]
    lines = lines[:-1] if lines[-1] == "" else lines
    notes = footnotes(summaries, len(p_adjusted))
    lines += notes
    out = Path(out)
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    kill_point("report-file")
    document = {
        "schema_version": SCHEMA_VERSION,
        "provenance": summaries[0]["provenance"],
        "tables": tables,
        "published_cards": [to_dict(c) for c in published],
        "claims": checked,
        "multiple_comparisons": {"method": "holm", "comparisons": len(p_adjusted)},
    }
    write_text_atomic(out.with_suffix(".json"), json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n")
    kill_point("report-file")
    image_grid(next(iter(by_suite.values())), out.with_suffix(".png"))
    if html:
        groups = [(group, row_labels(group)) for group in by_suite.values()]
        write_text_atomic(out.with_suffix(".html"), html_page(groups, tables, document, notes))
    return {"report": str(out), "tables": len(tables)}
