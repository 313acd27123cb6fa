"""Harness stage ``report``: ``summary.json`` files -> a markdown leaderboard, a PNG grid, JSON.

Rendered from the summaries alone (every number traces back to scores and images on disk). One
table per suite: a column per metric with its direction, version and units in the header, best in
bold and second underlined, the 95% interval beside each value, the measured NFE, published numbers
beside reproduced ones where a card has them, and a dagger on cells whose metric the method was
trained on. Paired differences against the reference method get their own table. Set metrics
(one value per run, e.g. a Fréchet distance) show their value without an interval; every
``category_mean`` metric (GenEval's task-averaged score) gets a per-category table, GenEval-style.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from bench.generate import MANIFEST, read_jsonl
from bench.methods import MethodCard
from rtdmd.checkpoint import write_text_atomic
from rtdmd.config import to_dict

GRID_PROMPTS = 6
GRID_CELL = 128


def fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"


def fmt_nfe(nfe: float | list[float]) -> str:
    """Measured forward passes per image; several values if the chunks differed."""
    values = nfe if isinstance(nfe, list) else [nfe]
    return "/".join(f"{v:g}" for v in values)


def ranks(values: dict[str, float], higher_is_better: bool) -> dict[str, int]:
    """Rank of each method (0 = best) for bold/underline; ties share a rank."""
    ordered = sorted(set(values.values()), reverse=higher_is_better)
    return {name: ordered.index(v) for name, v in values.items()}


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


def suite_table(summaries: list[dict], extra: list[dict]) -> tuple[list[str], dict]:
    suite = summaries[0]["suite"]
    metrics = sorted({m for s in summaries for m in s["metrics"]})
    info = {m: next(s["metrics"][m] for s in summaries if m in s["metrics"]) for m in metrics}
    head = ["Method", "NFE"] + [
        f"{m} {arrow(info[m])} (v{info[m]['version']}, {info[m]['units'] or 'native units'})" for m in metrics
    ]
    lines = [
        f"## {suite['name']}",
        "",
        f"Suite version {suite['version']}, sha256 `{suite['sha256'][:16]}`, {suite['prompts']} prompts × {suite['images_per_prompt']} images.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    by_metric_rank = {
        m: ranks(
            {s["method"]["name"]: s["metrics"][m]["value"] for s in summaries if m in s["metrics"]},
            info[m]["higher_is_better"],
        )
        for m in metrics
    }
    table = {
        "suite": suite,
        "metrics": {m: {k: info[m][k] for k in ("version", "units", "higher_is_better", "aggregate")} for m in metrics},
        "rows": [],
    }
    for s in summaries:
        method = s["method"]
        pub = {k: v for p in method["published"] for k, v in p["scores"].items()}
        cells, row = [method["display"], fmt_nfe(s["nfe"])], {"method": method["name"], "nfe": s["nfe"], "values": {}}
        for m in metrics:
            if m not in s["metrics"]:
                cells.append("–")
                continue
            entry = s["metrics"][m]
            text = marked(value_text(entry), by_metric_rank[m][method["name"]])
            if m in method["trained_on"]:
                text += " †"
            if m in pub:
                text += f" · pub. {fmt(pub[m])}"
            cells.append(text)
            row["values"][m] = {"value": entry["value"], "ci95": entry["ci95"], "published": pub.get(m)}
            if entry["aggregate"] == "category_mean":
                row["values"][m] |= {"image_mean": entry["image_mean"], "per_category": entry["per_category"]}
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
    lines += paired_table(summaries, metrics, info)
    for m in metrics:
        if info[m]["aggregate"] == "category_mean":
            lines += category_table(summaries, m)
    return lines, table


def category_table(summaries: list[dict], metric: str) -> list[str]:
    """GenEval-style per-task table of one ``category_mean`` metric: overall (mean of the category
    means), the plain mean over prompts, then each category in the suite's order."""
    entries = {s["method"]["name"]: s["metrics"][metric] for s in summaries if metric in s["metrics"]}
    first = next(iter(entries.values()))
    categories = list(dict.fromkeys(c for e in entries.values() for c in e["categories"]))
    columns = {"Overall": "value", "Prompt mean": "image_mean"} | {c: c for c in categories}
    values = {
        column: {
            name: e[key] if key in ("value", "image_mean") else e["per_category"].get(key)
            for name, e in entries.items()
        }
        for column, key in columns.items()
    }
    rank = {
        column: ranks({n: v for n, v in by_name.items() if v is not None}, first["higher_is_better"])
        for column, by_name in values.items()
    }
    lines = [
        "",
        f"{metric} {arrow(first)} by category (v{first['version']}): Overall is the mean "
        "of the category means, Prompt mean the plain mean over prompts.",
        "",
        "| Method | " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
    ]
    for s in summaries:
        name = s["method"]["name"]
        if name not in entries:
            continue
        cells = ["–" if values[c][name] is None else marked(fmt(values[c][name]), rank[c].get(name)) for c in columns]
        lines.append(f"| {s['method']['display']} | " + " | ".join(cells) + " |")
    return lines


def paired_table(summaries: list[dict], metrics: list[str], info: dict[str, dict]) -> list[str]:
    """Differences against the reference; the header's arrow says which sign is an improvement."""
    compared = [s for s in summaries if any("vs_reference" in e for e in s["metrics"].values())]
    if not compared:
        return []
    reference = next(
        e["vs_reference"]["reference"] for s in compared for e in s["metrics"].values() if "vs_reference" in e
    )
    lines = [
        "",
        f"Paired difference against **{reference}** on the same prompts and seeds (mean, 95% interval, p-value):",
        "",
    ]
    lines += [
        "| Method | " + " | ".join(f"{m} {arrow(info[m])}" for m in metrics) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|",
    ]
    for s in compared:
        cells = []
        for m in metrics:
            d = s["metrics"].get(m, {}).get("vs_reference")
            if d is None:
                cells.append("–")
            elif d["ci_low"] is None:  # a set metric: one value per run, no interval
                cells.append(f"{d['diff']:+.4f} (set)")
            else:
                cells.append(f"{d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], p={d['p_value']:.3g}")
        lines.append(f"| {s['method']['display']} | " + " | ".join(cells) + " |")
    return lines


def footnotes(summaries: list[dict]) -> list[str]:
    prov = summaries[0]["provenance"]
    packages = ", ".join(f"{k} {v}" for k, v in sorted(prov["packages"].items()) if v)
    aggregates = {e["aggregate"] for s in summaries for e in s["metrics"].values()}
    extra = []
    if "category_mean" in aggregates:
        extra.append(
            "Metrics averaged by category (GenEval's overall score) report the mean of the per-category means; "
            "their per-category table also gives the plain mean over prompts."
        )
    if "set" in aggregates:
        extra.append(
            "Set metrics score all images of a run at once (one value per run): no per-prompt interval, and the "
            'paired column gives the plain difference of values, marked "(set)".'
        )
    return [
        "",
        "Values: mean over prompts of each prompt's mean score; [a, b] is a 95% bootstrap interval over prompts "
        "(10,000 resamples). **Bold** best, <u>underlined</u> second. † the method was trained on this metric's reward. "
        '"pub." is the number the method\'s source reports (its own protocol). NFE counts transformer forward passes '
        "per image, measured (classifier-free guidance counts twice).",
        *(line for note in extra for line in ("", note)),
        "",
        "Seeds: image k of prompt p has its initial latent and every injected noise drawn from "
        f'seed_for(seed, "<suite>/<p>", k, step) with seed {summaries[0]["seed"]}: the same on any batch size, GPU count or order.',
        "",
        f"Generated by rtdmd {prov['rtdmd_git'][:12]} ({prov['rtdmd_commit_date']}); {packages}.",
    ]


def grid_prompts(manifest: list[dict], count: int) -> list[str]:
    """Prompt ids for the grid: the first prompt of each category (GenEval's tasks), then the
    following prompts, ``count`` in all."""
    ids = list(dict.fromkeys(r["prompt_id"] for r in manifest))
    first = list({r["category"]: r["prompt_id"] for r in reversed(manifest)}.values())[::-1]
    return list(dict.fromkeys(first + ids))[:count]


def image_grid(summaries: list[dict], path: Path) -> None:
    """Image 0 of a few prompts (one per category first) for every method of the first suite: one
    row per method, the prompts written above their column."""
    import textwrap

    manifests = [[r for r in read_jsonl(Path(s["run_dir"]) / MANIFEST) if r["sample_index"] == 0] for s in summaries]
    chosen = grid_prompts(manifests[0], GRID_PROMPTS)
    header, label_w = 44, 160
    canvas = Image.new("RGB", (label_w + GRID_CELL * len(chosen), header + GRID_CELL * len(summaries)), "white")
    draw = ImageDraw.Draw(canvas)
    prompts = {r["prompt_id"]: r["prompt"] for r in manifests[0]}
    for j, prompt_id in enumerate(chosen):
        draw.multiline_text((label_w + j * GRID_CELL + 2, 2), textwrap.fill(prompts[prompt_id], 21)[:90], fill="black")
    for i, (s, manifest) in enumerate(zip(summaries, manifests, strict=True)):
        top = header + i * GRID_CELL
        draw.multiline_text((4, top + GRID_CELL // 2 - 12), textwrap.fill(s["method"]["display"], 26), fill="black")
        files = {r["prompt_id"]: Path(s["run_dir"]) / r["file"] for r in manifest}
        for j, prompt_id in enumerate(chosen):
            if prompt_id in files:
                image = Image.open(files[prompt_id]).convert("RGB")
                canvas.paste(
                    image.resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS), (label_w + j * GRID_CELL, top)
                )
    canvas.save(path, format="PNG")


def report_stage(summary_paths: list[Path], out: Path, published: list[MethodCard] = (), claims=None) -> dict:
    """Write the leaderboard (markdown, JSON, image grid); ``claims``: a :class:`bench.claims.ClaimCard`
    whose claims are checked against these summaries and stated after the tables."""
    summaries = [json.loads(Path(p).read_text()) for p in summary_paths]
    if not summaries:
        raise ValueError("no summary.json files given")
    by_suite: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        by_suite[(s["suite"]["name"], s["suite"]["version"], s["suite"]["sha256"])].append(s)
    lines, tables = ["# Leaderboard", ""], []
    for group in by_suite.values():
        present = {s["method"]["name"] for s in group}
        block, table = suite_table(group, published_rows(list(published), group[0]["suite"]["name"], present))
        lines += block + [""]
        tables.append(table)
    checked = []
    if claims is not None:
        from bench.claims import check, claims_section

        checked = check(claims, summaries)
        lines += [*claims_section(claims, checked), ""]
    lines = lines[:-1] if lines[-1] == "" else lines
    lines += footnotes(summaries)
    out = Path(out)
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    write_text_atomic(
        out.with_suffix(".json"),
        json.dumps(
            {"tables": tables, "published_cards": [to_dict(c) for c in published], "claims": checked},
            indent=2,
            sort_keys=True,
        )
        + "\n",
    )
    image_grid(next(iter(by_suite.values())), out.with_suffix(".png"))
    return {"report": str(out), "tables": len(tables)}
