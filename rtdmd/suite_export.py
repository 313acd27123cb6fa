"""A prompt suite as a Hugging Face dataset folder: ``README.md`` (the dataset card), ``data/<split>.jsonl``
and the upstream ``LICENSE``; what ``rtdmd-bench suites export`` writes and the project's ``prompts/`` holds.

The folder loads with ``datasets.load_dataset("prompts/<name>")`` and, offline, in the harness
(:func:`rtdmd.suites.load_suite` checks it against the card's ``rows_sha256``). A suite whose licence does
not allow redistribution gets the card alone: its prompts are downloaded at run time on the user's
machine and never written into a folder meant to be shared.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rtdmd.errors import RtdmdError
from rtdmd.files import write_bytes_atomic, write_text_atomic
from rtdmd.suites import CACHE, ROW_KEYS, SuiteCard, data_file, load_suite, project_prompts, rows_bytes, sha256_bytes

FEATURES = {
    "prompt_id": "the prompt's id within the suite (the seed coordinate of its images)",
    "prompt": "the prompt text",
    "category": "the suite's category of the prompt ('' where it has none)",
    "metadata": "a JSON object as text: what the suite's metrics need (GenEval: tag, include, exclude)",
}


class ExportError(RtdmdError, ValueError):
    """A suite that cannot be exported or pushed as asked."""


def hub_licence(licence: str) -> str:
    """The Hub's licence id for a card's licence text ('other' where there is no exact id)."""
    for prefix, hub_id in (("MIT", "mit"), ("Apache-2.0", "apache-2.0")):
        if licence.startswith(prefix):
            return hub_id
    return "other"


def size_category(rows: int) -> str:
    return next(
        label for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")) if rows < bound
    )


def front_matter(card: SuiteCard) -> dict:
    """The dataset card's YAML header: what the Hub and ``datasets.load_dataset`` read."""
    header: dict = {
        "pretty_name": f"{card.name} (rtdmd prompt suite, version {card.version})",
        "license": hub_licence(card.licence),
        "language": ["en"],
        "task_categories": ["text-to-image"],
        "size_categories": [size_category(card.rows)],
    }
    if card.redistribute:
        header["configs"] = [{"config_name": "default", "data_files": [{"split": card.split, "path": data_file(card)}]}]
        header["dataset_info"] = {
            "features": [{"name": name, "dtype": "string"} for name in ROW_KEYS],
            "splits": [{"name": card.split, "num_examples": card.rows}],
        }
    return header


def dataset_card(card: SuiteCard) -> str:
    """``README.md`` of the folder: licence, upstream source and files with their sha256, suite version,
    features, split, protocol, metric notes, citation, and how to load it."""
    files = "\n".join(f"| `{f.path}` | `{f.sha256 or 'not pinned'}` | {f.url or card.source} |" for f in card.files)
    if card.redistribute:
        data = (
            f"`{data_file(card)}`: {card.rows} rows, split `{card.split}`, sha256 `{card.rows_sha256}` "
            "(the card's `rows_sha256`: the harness refuses a folder whose rows differ).\n\n"
            "| column | type | meaning |\n|---|---|---|\n"
            + "\n".join(f"| `{name}` | string | {meaning} |" for name, meaning in FEATURES.items())
            + f"\n\n```python\nimport datasets\nrows = datasets.load_dataset('prompts/{card.name}', split='{card.split}')\n```\n\n"
            f"`rtdmd-bench run --suite {card.name}` reads this folder offline."
        )
    else:
        data = (
            f"The licence ({card.licence}) does not allow redistributing these prompts, so this folder holds the "
            f"card only. `rtdmd-bench run --suite {card.name}` downloads the upstream file(s) on your machine "
            f"(into `{CACHE}`) and checks the sha256 below"
            + (f"; {card.download_note}" if card.download_note else "")
            + "."
        )
    body = [
        f"# {card.name}",
        card.description,
        f"- suite version: {card.version}\n- licence: {card.licence}\n- upstream: {card.source}\n"
        f"- protocol: {card.images_per_prompt} image(s) per prompt; default metrics: {', '.join(card.default_metrics) or 'none'}",
        "## Data",
        data,
        "## Upstream files",
        "| file | sha256 | from |\n|---|---|---|\n" + files,
    ]
    if card.metric_note:
        body += ["## Metrics", card.metric_note]
    if card.citation:
        body += ["## Citation", card.citation]
    body.append(
        f"Written by `rtdmd-bench suites export {card.name}` from the suite card `rtdmd/cards/suites/{card.name}.yaml`."
    )
    return "---\n" + yaml.safe_dump(front_matter(card), sort_keys=False) + "---\n\n" + "\n\n".join(body) + "\n"


def licence_text(card: SuiteCard, prompts_dir: Path | None) -> bytes:
    """The upstream licence file, from ``prompts_dir``, the download cache or the project's folder; sha256-checked."""
    entry = card.licence_file
    assert entry is not None
    places = ([prompts_dir / entry.path] if prompts_dir else []) + [
        CACHE / entry.path,
        *(root / card.name / "LICENSE" for root in project_prompts()),
    ]
    for path in places:
        if path.is_file() and sha256_bytes(path.read_bytes()) == entry.sha256:
            return path.read_bytes()
    raise ExportError(
        f"suite {card.name}: its licence file {entry.path} (sha256 {entry.sha256[:16]}...) is not in "
        f"{', '.join(str(p.parent) for p in places)}; copy the LICENSE of {card.source} there"
    )


def export_suite(card: SuiteCard, out: Path, prompts_dir: Path | None = None, download: bool = True) -> list[Path]:
    """Write the suite of ``card`` as a dataset folder at ``out`` (the card alone where it may not be
    redistributed); returns the files written."""
    out = Path(out)
    suite = load_suite(card.name, prompts_dir, download=download) if card.redistribute else None
    written = [write_text_atomic(out / "README.md", dataset_card(card))]
    if suite is not None:
        data = rows_bytes(suite.rows)
        if sha256_bytes(data) != card.rows_sha256:  # load_suite checked it; a row edited in between is a bug
            raise ExportError(f"suite {card.name}: rows differ from the card's rows_sha256")
        written.append(write_bytes_atomic(out / data_file(card), data))
        if card.licence_file is not None:
            written.append(write_bytes_atomic(out / "LICENSE", licence_text(card, prompts_dir)))
    return written


def check_push(card: SuiteCard) -> None:
    if not card.redistribute:
        raise ExportError(
            f"suite {card.name} may not be redistributed ({card.licence}): its folder holds the card only, so there is "
            f"nothing to push; `rtdmd-bench run --suite {card.name}` downloads its prompts where they are used"
        )


def push_to_hub(card: SuiteCard, folder: Path, repo_id: str, private: bool) -> str:
    """Upload an exported folder as a Hub dataset (needs a token: ``huggingface-cli login``); returns its URL.
    A suite that may not be redistributed is refused."""
    check_push(card)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")
    return str(getattr(commit, "commit_url", f"https://huggingface.co/datasets/{repo_id}"))
