"""``report --html``: one self-contained HTML page per leaderboard, to browse the images behind the numbers.

The page holds, per suite, the leaderboard table (every column sortable by a click: values, not text, are
compared) and a gallery: for each category (GenEval's tasks; one group where a suite has none) the first
:data:`GALLERY_PROMPTS` prompts as rows and the runs as columns, each cell image 0 of the first run seed
with its per-image scores. Images are embedded as JPEG data URIs (at most :data:`THUMB` pixels a side), so
the file can be mailed or archived alone. Built from the summaries and the run folders they name, like the
markdown; nothing is fetched from the network when the page opens.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

from PIL import Image

from bench.runfiles import cache_key, read_manifest, read_scores

GALLERY_PROMPTS = 8
THUMB = 160

SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var up = th.getAttribute('data-dir') !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', up ? 'asc' : 'desc');
      function key(row) {
        var cell = row.cells[col], v = cell.getAttribute('data-value');
        return v === null ? cell.textContent : (v === '' ? NaN : parseFloat(v));
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x === 'number' && typeof y === 'number') {
          if (isNaN(x)) return 1; if (isNaN(y)) return -1;
          return up ? x - y : y - x;
        }
        return up ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
table.sortable th { cursor: pointer; background: #f3f3f3; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
td.cell img { display: block; width: 160px; height: auto; }
td.cell small, td.prompt { font-size: 12px; } td.prompt { max-width: 220px; text-align: left; }
"""


def thumbnail(path: Path) -> str:
    """A JPEG data URI of the image, at most :data:`THUMB` pixels a side."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def leaderboard_table(table: dict) -> list[str]:
    """The suite's leaderboard (``leaderboard.json``'s table) as a sortable HTML table."""
    metrics = list(table["metrics"])
    head = "".join(
        f"<th>{html.escape(m)} {'↑' if table['metrics'][m]['higher_is_better'] else '↓'}</th>" for m in metrics
    )
    lines = [
        '<table class="sortable leaderboard">',
        f"<thead><tr><th>method</th><th>NFE</th>{head}</tr></thead><tbody>",
    ]
    for row in table["rows"]:
        label = html.escape(row.get("label") or f"{row['method']} (published)")
        nfe = row.get("nfe")
        cells = [
            f"<td>{label}</td>",
            f'<td data-value="{nfe if isinstance(nfe, (int, float)) else ""}">{nfe if nfe is not None else "–"}</td>',
        ]
        for m in metrics:
            value = row["values"].get(m)
            if isinstance(value, dict):
                interval = f" [{value['ci95'][0]:.4f}, {value['ci95'][1]:.4f}]" if value.get("ci95") else ""
                cells.append(f'<td data-value="{value["value"]!r}">{value["value"]:.4f}<small>{interval}</small></td>')
            elif isinstance(value, (int, float)):
                cells.append(f'<td data-value="{value!r}">{value:.4f}</td>')
            else:
                cells.append('<td data-value="">–</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return [*lines, "</tbody></table>"]


def gallery(summaries: list[dict], labels: list[str]) -> list[str]:
    """Prompts (rows) by runs (columns) per category, image 0 of each run's first seed, with its scores."""
    runs = []
    for summary in summaries:
        root = Path(summary["run_dir"])
        manifest = [r for r in read_manifest(root) if r["sample_index"] == 0 and r["seed"] == summary["seeds"][0]]
        scores: dict[tuple, float] = {}
        for r in read_scores(root):
            if summary["metrics"].get(r["metric"], {}).get("version") == r["version"]:
                scores[cache_key(r, r["metric"], r["version"])] = r["score"]
        runs.append((root, {r["prompt_id"]: r for r in manifest}, scores, summary["metrics"]))
    first = list(runs[0][1].values())
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in first:
        by_category[row["category"] or "all prompts"].append(row)
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    lines = []
    for category, rows in by_category.items():
        lines += [f"<h3>{html.escape(category)}</h3>", '<table class="gallery">', f"<tr><th>prompt</th>{head}</tr>"]
        for row in rows[:GALLERY_PROMPTS]:
            cells = [f'<td class="prompt">{html.escape(row["prompt"])}</td>']
            for root, by_id, scores, metrics in runs:
                image = by_id.get(row["prompt_id"])
                if image is None:
                    cells.append("<td>–</td>")
                    continue
                values = [
                    f"{html.escape(m)} {scores[key]:.3f}"
                    for m in sorted(metrics)
                    if (key := cache_key(image, m, metrics[m]["version"])) in scores
                ]
                alt = html.escape(f"{image['method']}: {row['prompt']}")
                cells.append(
                    f'<td class="cell"><img alt="{alt}" src="{thumbnail(root / image["file"])}">'
                    f"<small>{'<br>'.join(values)}</small></td>"
                )
            lines.append("<tr>" + "".join(cells) + "</tr>")
        lines.append("</table>")
    return lines


def html_page(
    groups: list[tuple[list[dict], list[str]]], tables: list[dict], document: dict, footnotes: list[str]
) -> str:
    """The whole page: per suite its leaderboard table and gallery, then the report's footnotes."""
    body = ["<h1>Leaderboard</h1>"]
    for (summaries, labels), table in zip(groups, tables, strict=True):
        suite = table["suite"]
        body += [
            f"<h2>{html.escape(suite['name'])}</h2>",
            f"<p>Suite version {html.escape(str(suite['version']))}, {suite['prompts']} prompts × "
            f"{suite['images_per_prompt']} images. Click a column header to sort.</p>",
            *([f"<p><b>Metrics:</b> {html.escape(suite['metric_note'])}</p>"] if suite.get("metric_note") else []),
            *leaderboard_table(table),
            f"<h2>{html.escape(suite['name'])}: images</h2>",
            *gallery(summaries, labels),
        ]
    body += [f"<p>{html.escape(line)}</p>" for line in footnotes if line]
    meta = html.escape(json.dumps({"schema_version": document["schema_version"]}))
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="rtdmd-leaderboard" content="{meta}"><title>rtdmd leaderboard</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + f"\n<script>{SORT_SCRIPT}</script></body></html>\n"
    )
