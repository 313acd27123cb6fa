"""Prompt suites: YAML cards (``rtdmd/cards/suites/*.yaml``) -> Hugging Face ``datasets.Dataset``.

A card names the canonical upstream file(s), their sha256, licence, field mapping, images per prompt
and default metrics. The rows of a suite come from, in this order: its upstream files in a local
directory (``--prompts-dir``; tests use ``../shared/prompts``); a Hugging Face dataset folder
``<prompts-dir>/<name>/`` or the project's ``prompts/<name>/`` (``$RTDMD_PROMPTS/<name>/`` where the
package is installed from a wheel; written by
``rtdmd-bench suites export`` for the suites whose licence allows it, checked against the card's
``rows_sha256``); the download cache (``~/.cache/rtdmd/prompts``); the canonical URL, downloaded into
the cache. A file with a ``package`` is package data of that Python package instead (the generated toy
suites). Every hash is checked every time; a mismatch is an error, and either source gives the same
rows and the same suite fingerprint. A suite may also be any user file (``.jsonl``,
``.txt``, ``.csv``, ``.tsv``, ``.json``) or a Hugging Face hub dataset id (``hub:owner/name``).

Dataset columns: ``suite, prompt_id, prompt, category, metadata`` (a JSON string) and
``images_per_prompt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rtdmd.config import ConfigError, from_dict, yaml_mapping
from rtdmd.data import Format, raw_records
from rtdmd.errors import RtdmdError
from rtdmd.files import write_bytes_atomic, write_text_atomic
from rtdmd.registry import did_you_mean

CACHE = Path.home() / ".cache" / "rtdmd" / "prompts"
# the project's dataset folders beside the package (a checkout or an editable install; a wheel has none:
# there $RTDMD_PROMPTS names a copy of the checkout's prompts/)
PROJECT_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
PROMPTS_ENV = "RTDMD_PROMPTS"


def project_prompts() -> list[Path]:
    """Where the project's dataset folders may be: ``$RTDMD_PROMPTS``, then ``prompts/`` beside the package."""
    return ([Path(os.environ[PROMPTS_ENV])] if os.environ.get(PROMPTS_ENV) else []) + [PROJECT_PROMPTS]


ROW_KEYS = ("prompt_id", "prompt", "category", "metadata")  # a dataset folder's columns


class SuiteError(RtdmdError, ValueError):
    """A suite that cannot be loaded: unknown name, missing or tampered file."""


@dataclass(frozen=True)
class SuiteFile:
    """One upstream file. ``sha256`` empty = the upstream file is not pinned yet: the first download
    is trusted and its hash recorded in the cache's lock file (and in every manifest)."""

    path: str  # relative to a prompts directory, e.g. "geneval/evaluation_metadata.jsonl"
    sha256: str = ""
    url: str = ""  # canonical raw download URL ("" = no single-file download)
    category: str = ""  # the category of every row of this file (multi-file suites)
    # a Python package holding the file as package data ("" = an upstream file); `path` is then
    # relative to that package, read through importlib.resources, and `sha256` is required
    package: str = ""

    def validate(self) -> None:
        if self.package and (self.url or not self.sha256):
            raise ValueError(f"packaged file {self.path}: give its sha256 and no url")


@dataclass(frozen=True)
class SuiteCard:
    name: str
    version: str
    description: str
    source: str  # the canonical upstream, for humans
    licence: str
    redistribute: bool  # False: never write these prompts into a repository or a shared artefact
    format: Format
    files: tuple[SuiteFile, ...]
    rows: int  # prompts after `unique`
    images_per_prompt: int = 1
    default_metrics: tuple[str, ...] = ()
    prompt_field: str = "prompt"
    category_field: str = ""
    id_field: str = ""
    metadata_fields: tuple[str, ...] = ()
    unique: bool = False  # drop repeated prompts (DrawBench's file repeats each prompt 5 times)
    download_note: str = ""  # how to obtain the files when there is no single-file URL
    # sha256 of the rows as a dataset folder holds them (:func:`rows_bytes`); required where the suite
    # may be redistributed, so a dataset folder is checked against the card as the upstream files are
    rows_sha256: str = ""
    licence_file: SuiteFile | None = None  # the upstream licence text, copied into an exported folder
    citation: str = ""
    split: str = "test"  # the split name of an exported dataset folder
    # what the default metrics do and do not measure, where they stand in for the benchmark's own scorer;
    # shown in `suites`, the dataset card and every leaderboard of the suite
    metric_note: str = ""

    def validate(self) -> None:
        if not self.files:
            raise ValueError("a suite needs at least one file")
        if self.images_per_prompt < 1 or self.rows < 1:
            raise ValueError("rows and images_per_prompt must be >= 1")
        if self.redistribute and not (self.rows_sha256 and all(f.sha256 for f in self.files)):
            raise ValueError("a redistributable suite pins its files' sha256 and its rows_sha256")


@dataclass(frozen=True)
class Suite:
    """A loaded suite: its card, the resolved files' hashes and the rows."""

    card: SuiteCard
    sha256: str  # of the sorted per-file hashes: one fingerprint for the whole suite
    rows: list[dict[str, Any]] = field(repr=False)

    def dataset(self):
        """The rows as a ``datasets.Dataset`` (columns documented in the module docstring)."""
        import datasets

        return datasets.Dataset.from_list(self.rows)


def card_names() -> list[str]:
    root = resources.files("rtdmd") / "cards" / "suites"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_card(name: str) -> SuiteCard:
    path = resources.files("rtdmd") / "cards" / "suites" / f"{name}.yaml"
    if not path.is_file():
        raise SuiteError(f"unknown suite {name!r}{did_you_mean(name, card_names())}; known: {', '.join(card_names())}")
    try:
        return from_dict(SuiteCard, yaml_mapping(path.read_text(), "the file"))
    except ConfigError as error:
        raise SuiteError(f"suite card {name}: {error}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_bytes(rows: list[dict[str, Any]]) -> bytes:
    """A suite's rows as a dataset folder stores them: one JSON object per line with the keys
    :data:`ROW_KEYS` (sorted, UTF-8); ``rows_sha256`` of a card is the sha256 of these bytes."""
    return "".join(
        json.dumps({k: row[k] for k in ROW_KEYS}, sort_keys=True, ensure_ascii=False) + "\n" for row in rows
    ).encode()


def data_file(card: SuiteCard) -> str:
    """Where a dataset folder keeps the rows, relative to the folder."""
    return f"data/{card.split}.jsonl"


def _folder_rows(card: SuiteCard, folders: list[Path]) -> list[dict[str, Any]] | None:
    """The rows of the first dataset folder among ``folders`` that holds the suite; None if none does.
    A folder whose rows differ from the card's ``rows_sha256`` is an error, not a fallback."""
    for folder in folders:
        path = folder / data_file(card)
        if not path.is_file():
            continue
        data = path.read_bytes()
        if sha256_bytes(data) != card.rows_sha256:
            raise SuiteError(
                f"suite {card.name}: {path} has sha256 {sha256_bytes(data)[:16]}..., the card expects "
                f"{card.rows_sha256[:16]}... (a modified folder: `rtdmd-bench suites export {card.name} {folder}` "
                "writes it again)"
            )
        return [
            {"suite": card.name, **{k: r[k] for k in ROW_KEYS}, "images_per_prompt": card.images_per_prompt}
            for r in raw_records(data, "jsonl", str(path))
        ]
    return None


def _lock_path() -> Path:
    return CACHE / "lock.json"


def build_dpg(prompt_dir: Path) -> bytes:
    """DPG-Bench's prompts.jsonl from ELLA's ``dpg_bench/prompts/<id>.txt`` files: ``{"id", "prompt"}``
    per file, the text stripped, sorted by id (the layout the card's sha256 pins)."""
    files = sorted(Path(prompt_dir).glob("*.txt"), key=lambda p: p.stem)
    if not files:
        raise SuiteError(f"{prompt_dir} holds no .txt prompt files")
    return "".join(
        json.dumps({"id": f.stem, "prompt": f.read_text(encoding="utf-8").strip()}, ensure_ascii=False) + "\n"
        for f in files
    ).encode()


def _packaged(entry: SuiteFile, card: SuiteCard) -> tuple[bytes, str]:
    """A file shipped inside a Python package; verified against the card's sha256."""
    where = f"{entry.package}/{entry.path}"
    try:
        resource = resources.files(entry.package).joinpath(entry.path)
    except (ModuleNotFoundError, TypeError):  # TypeError: a module, not a package
        raise SuiteError(
            f"suite {card.name}: {entry.package!r} of {entry.path} is not an installed Python package"
        ) from None
    if not resource.is_file():
        raise SuiteError(f"suite {card.name}: packaged file {where} is missing; regenerate it with `{card.source}`")
    data = resource.read_bytes()
    digest = sha256_bytes(data)
    if digest != entry.sha256:
        raise SuiteError(
            f"suite {card.name}: packaged file {where} has sha256 {digest[:16]}..., the card expects "
            f"{entry.sha256[:16]}... (a modified file; regenerate it with `{card.source}`)"
        )
    return data, digest


def _fetch(entry: SuiteFile, card: SuiteCard, prompts_dir: Path | None, download: bool) -> tuple[bytes, str]:
    """The file's bytes from the package, the local dir, the cache or the network; verified against its sha256."""
    if entry.package:
        return _packaged(entry, card)
    candidates = ([prompts_dir / entry.path] if prompts_dir else []) + [CACHE / entry.path]
    lock = json.loads(_lock_path().read_text()) if _lock_path().exists() else {}
    expected = entry.sha256 or lock.get(entry.path, "")
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            digest = sha256_bytes(data)
            if expected and digest != expected:
                raise SuiteError(
                    f"suite {card.name}: {path} has sha256 {digest[:16]}..., the card expects {expected[:16]}... "
                    f"(a modified or different file; the canonical one is {entry.url or card.source})"
                )
            if not expected:
                _pin(lock, entry.path, digest)
            return data, digest
    if not (download and entry.url):
        where = f" or {prompts_dir / entry.path}" if prompts_dir else ""
        how = f"download it from {entry.url}" if entry.url else (card.download_note or f"get it from {card.source}")
        raise SuiteError(
            f"suite {card.name}: {entry.path} is not in {CACHE}{where}; {how} (sha256 {entry.sha256 or 'unpinned'})"
        )
    with urllib.request.urlopen(entry.url, timeout=60) as response:  # noqa: S310 (a URL from a packaged card)
        data = response.read()
    digest = sha256_bytes(data)
    if expected and digest != expected:
        raise SuiteError(f"suite {card.name}: the download of {entry.url} has sha256 {digest}, expected {expected}")
    write_bytes_atomic(CACHE / entry.path, data)
    if not expected:
        _pin(lock, entry.path, digest)
    return data, digest


def _pin(lock: dict[str, str], path: str, digest: str) -> None:
    """Trust an unpinned upstream file on first use and verify it against that hash from then on."""
    lock[path] = digest
    write_text_atomic(_lock_path(), json.dumps(lock, indent=2, sort_keys=True))


def rows_from_records(card: SuiteCard, records_per_file: list[tuple[SuiteFile, list]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    per_file: dict[str, int] = {}
    for entry, records in records_per_file:
        for record in records:
            if isinstance(record, str):
                record = {card.prompt_field: record}
            prompt = str(record.get(card.prompt_field, "")).strip()
            if not prompt:
                raise SuiteError(
                    f"suite {card.name}: a record of {entry.path} has no {card.prompt_field!r}: {str(record)[:80]}"
                )
            if card.unique and prompt in seen:
                continue
            seen.add(prompt)
            category = entry.category or (str(record.get(card.category_field, "")) if card.category_field else "")
            index = per_file.get(entry.path, 0) if entry.category else len(rows)
            per_file[entry.path] = per_file.get(entry.path, 0) + 1
            local_id = str(record[card.id_field]) if card.id_field else f"{index:05d}"
            rows.append(
                {
                    "suite": card.name,
                    "prompt_id": f"{entry.category}/{local_id}" if entry.category else local_id,
                    "prompt": prompt,
                    "category": category,
                    "metadata": json.dumps({k: record[k] for k in card.metadata_fields if k in record}, sort_keys=True),
                    "images_per_prompt": card.images_per_prompt,
                }
            )
    return rows


def load_suite(
    name_or_path: str, prompts_dir: str | Path | None = None, download: bool = True, images_per_prompt: int = 0
) -> Suite:
    """A packaged suite by name, a user file (path), or a hub dataset (``hub:owner/name``)."""
    if name_or_path.startswith("hub:"):
        return _hub_suite(name_or_path[4:], images_per_prompt or 1)
    path = Path(name_or_path)
    if (
        path.suffix in (".jsonl", ".txt", ".tsv", ".csv", ".json")
        and not (resources.files("rtdmd") / "cards" / "suites" / f"{name_or_path}.yaml").is_file()
    ):
        return _file_suite(path, images_per_prompt or 1)
    card = load_card(name_or_path)
    if images_per_prompt:
        card = _replace(card, images_per_prompt=images_per_prompt)
    local = Path(prompts_dir) if prompts_dir else None
    upstream_here = all(entry.package or (local and (local / entry.path).is_file()) for entry in card.files)
    folders = [root / card.name for root in ([local] if local else []) + project_prompts()]
    rows = None if upstream_here or not card.rows_sha256 else _folder_rows(card, folders)
    if rows is not None:
        digests = [entry.sha256 for entry in card.files]  # pinned: the folder's rows are those files' rows
    else:
        fetched = [(entry, *_fetch(entry, card, local, download)) for entry in card.files]
        digests = [digest for _, _, digest in fetched]
        rows = rows_from_records(
            card,
            [(entry, raw_records(data, card.format, f"suite {card.name}: {entry.path}")) for entry, data, _ in fetched],
        )
        if card.rows_sha256 and sha256_bytes(rows_bytes(rows)) != card.rows_sha256:
            raise SuiteError(
                f"suite {card.name}: its files parse into rows with sha256 {sha256_bytes(rows_bytes(rows))[:16]}..., "
                f"the card expects {card.rows_sha256[:16]}... (the card's field mapping and rows_sha256 disagree)"
            )
    if len(rows) != card.rows:
        raise SuiteError(f"suite {card.name}: {len(rows)} prompts, the card expects {card.rows}")
    ids = [r["prompt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SuiteError(f"suite {card.name}: prompt ids are not unique")
    return Suite(card=card, sha256=sha256_bytes("\n".join(sorted(digests)).encode()), rows=rows)


def _replace(card: SuiteCard, **changes: Any) -> SuiteCard:
    import dataclasses

    return dataclasses.replace(card, **changes)


def _file_suite(path: Path, images_per_prompt: int) -> Suite:
    """A user file: .txt (one prompt per line), .jsonl / .json (objects with "prompt" and optional
    "id", "category" (else GenEval's "tag"), and "metadata", or else any other keys, which become the
    metadata), .csv / .tsv (columns "prompt" [, "id", "category"])."""
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    data = path.read_bytes()
    fmt: Format = path.suffix[1:]  # type: ignore[assignment]
    records = raw_records(data, fmt, f"suite file {path}")
    if not records:
        raise SuiteError(f"suite file {path} holds no prompts")
    has = lambda key: any(isinstance(r, dict) and key in r for r in records)  # noqa: E731
    # metadata: a "metadata" object, or else every other top-level key (GenEval's layout: tag, include,
    # exclude beside the prompt), so a GenEval-format file keeps what GenEval's metrics need
    reserved = {"prompt", "id", "category", "metadata"}
    flat = [] if has("metadata") else sorted({k for r in records if isinstance(r, dict) for k in r} - reserved)
    card = SuiteCard(
        name=path.stem,
        version=f"file:{sha256_bytes(data)[:12]}",
        description=f"user file {path}",
        source=str(path),
        licence="user",
        redistribute=False,
        format=fmt,
        files=(SuiteFile(path=path.name, sha256=sha256_bytes(data)),),
        rows=1,
        images_per_prompt=images_per_prompt,
        category_field="category" if has("category") else "tag" if has("tag") else "",
        id_field="id" if has("id") else "",
        metadata_fields=("metadata",) if has("metadata") else tuple(flat),
    )
    rows = rows_from_records(card, [(card.files[0], records)])
    if has("metadata"):
        for row in rows:  # a user "metadata" object is the metadata itself
            row["metadata"] = json.dumps(json.loads(row["metadata"]).get("metadata", {}), sort_keys=True)
    return Suite(card=_replace(card, rows=len(rows)), sha256=sha256_bytes(data), rows=rows)


def _hub_folder(spec: str) -> tuple[Path, str, str]:
    """``owner/name[@revision]`` -> (local snapshot folder, dataset id, commit); a local folder stands for itself."""
    dataset_id, _, revision = spec.partition("@")
    if Path(dataset_id).is_dir():
        return Path(dataset_id), dataset_id, ""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(dataset_id, repo_type="dataset", revision=revision or None))
    except Exception as error:  # noqa: BLE001 - offline, unknown id or revision, gated: all surface here
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise SuiteError(
            f"hub dataset {spec} cannot be loaded ({type(error).__name__}: {reason}); check the id, the revision and "
            "the network (HF_HUB_OFFLINE=1 reads only the local cache), or pass a local prompt file"
        ) from None
    return folder, dataset_id, folder.name  # the snapshot folder is named by the commit it holds


def _one_split(dataset_dict, spec: str):
    names = list(dataset_dict)
    if len(names) == 1:
        return dataset_dict[names[0]]
    for name in ("test", "validation", "train"):
        if name in names:
            return dataset_dict[name]
    raise SuiteError(f"hub dataset {spec} has splits {names} and none is test, validation or train")


def _hub_suite(spec: str, images_per_prompt: int) -> Suite:
    """A hub dataset (``owner/name[@revision]``, or a local dataset folder) with a "prompt" column and optional
    "id"/"prompt_id", "category" and "metadata" (a folder written by ``suites export`` has them all). The
    commit the revision resolved to is the suite's version, so a manifest names exactly the prompts it used."""
    import datasets

    folder, dataset_id, commit = _hub_folder(spec)
    try:
        ds = _one_split(datasets.load_dataset(str(folder)), spec)
    except SuiteError:
        raise
    except Exception as error:  # noqa: BLE001 - a folder that is not a dataset, a broken file
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise SuiteError(f"hub dataset {spec} cannot be loaded ({type(error).__name__}: {reason})") from None
    if "prompt" not in ds.column_names:
        raise SuiteError(f"hub dataset {spec} has no 'prompt' column (columns: {ds.column_names})")
    revision = spec.partition("@")[2]
    if not commit:
        note = "a local folder, not pinned"
    elif revision and commit.startswith(revision):
        note = f"pinned at {commit}"
    else:
        note = f"revision {revision or 'main'} resolved to {commit}; pass @{commit} to pin it"
    has = set(ds.column_names)
    card = SuiteCard(
        name=dataset_id.strip("/").replace("/", "__"),
        version=f"hub:{dataset_id}@{commit}" if commit else f"hub:{ds._fingerprint}",
        description=f"hub dataset {dataset_id} ({note})",
        source=f"hf:{dataset_id}",
        licence="see the dataset card",
        redistribute=False,
        format="json",
        files=(SuiteFile(path=dataset_id),),
        rows=len(ds),
        images_per_prompt=images_per_prompt,
        category_field="category" if "category" in has else "",
        id_field="prompt_id" if "prompt_id" in has else "id" if "id" in has else "",
    )
    rows = rows_from_records(card, [(card.files[0], [dict(r) for r in ds])])
    if "metadata" in has:  # kept as the JSON text the exported folder holds
        for row, record in zip(rows, ds, strict=True):
            row["metadata"] = (
                record["metadata"]
                if isinstance(record["metadata"], str)
                else json.dumps(record["metadata"], sort_keys=True)
            )
    return Suite(card=card, sha256=commit or ds._fingerprint, rows=rows)
