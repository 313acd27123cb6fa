"""Where metric weights (rewards, the GenEval detector) come from: one root for all metrics, the hub cache, or a download.

Every metric declares the exact files it needs as :class:`WeightFiles` (a hub repository and file
names, or one URL with its sha256). :func:`resolve` finds them, in this order:

1. ``<root>/<repo>/`` where ``root`` is ``--weights-dir`` or ``$RTDMD_WEIGHTS`` (a plain folder,
   e.g. filled by ``rtdmd-bench weights fetch``); URL files live in ``<root>/urls/``;
2. the Hugging Face cache (what ``from_pretrained`` would use; works with ``HF_HUB_OFFLINE=1``);
3. a download, unless ``HF_HUB_OFFLINE=1`` (into the cache, or into ``root`` when one is set).

When a file is missing everywhere, :class:`MissingWeights` names the metric, every missing file
and the one command that fetches them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rtdmd.errors import RtdmdError
from rtdmd.files import atomic_path, write_bytes_atomic, write_text_atomic

ENV = "RTDMD_WEIGHTS"
URL_CACHE = Path.home() / ".cache" / "rtdmd"  # URL files without a root (the hub has its own cache)


@dataclass(frozen=True)
class WeightFiles:
    """Files of one hub repository (``repo``, ``files``) or one URL (``url``, ``sha256``)."""

    repo: str = ""
    files: tuple[str, ...] = ()
    url: str = ""
    sha256: str = ""

    @property
    def folder(self) -> str:
        return self.repo or "urls"

    @property
    def names(self) -> tuple[str, ...]:
        return self.files or (self.url.rsplit("/", 1)[-1],)


class MissingWeights(RtdmdError, FileNotFoundError):
    pass


def weights_root(weights_dir: str | Path | None = None) -> Path | None:
    chosen = weights_dir or os.environ.get(ENV)
    return Path(chosen).expanduser() if chosen else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_root(spec: WeightFiles, root: Path | None) -> Path | None:
    if root is None:
        return None
    folder = root / spec.folder
    return folder if all((folder / name).is_file() for name in spec.names) else None


def _in_cache(spec: WeightFiles) -> Path | None:
    if not spec.repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(spec.repo, name) for name in spec.files]
    if all(isinstance(path, str) for path in found):
        return Path(found[0]).parent
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(spec: WeightFiles, root: Path | None) -> Path:
    """Download ``spec`` into ``root/<folder>`` (or the hub cache when ``root`` is None)."""
    if spec.repo:
        from huggingface_hub import hf_hub_download

        local = str(root / spec.folder) if root else None
        paths = [hf_hub_download(spec.repo, name, local_dir=local) for name in spec.files]
        return Path(paths[0]).parent
    target_dir = (root or URL_CACHE) / spec.folder
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / spec.names[0]
    with atomic_path(target) as partial:  # the download lands whole or not at all
        with urllib.request.urlopen(spec.url) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        if spec.sha256 and sha256_of(partial) != spec.sha256:
            raise ValueError(f"{spec.url}: sha256 differs from {spec.sha256}; the file was not kept")
    return target_dir


def locate(spec: WeightFiles, root: Path | None) -> Path | None:
    """The folder holding all of ``spec``'s files, without downloading; None if absent."""
    if (found := _in_root(spec, root)) is not None:
        return found
    if spec.url and root is None and (default := _in_root(spec, URL_CACHE)):
        return default
    return _in_cache(spec)


def fetch_command(metric: str, root: Path | None) -> str:
    return f"rtdmd-bench weights fetch {metric}" + (f" --weights-dir {root}" if root else "")


def _find_or_fetch(metric: str, spec: WeightFiles, root: Path | None) -> Path | str:
    """The folder with ``spec``'s files (found, else downloaded unless offline), or the sentence
    that says what is missing and why."""
    if (found := locate(spec, root)) is not None:
        if spec.sha256 and sha256_of(found / spec.names[0]) != spec.sha256:
            raise ValueError(f"{found / spec.names[0]}: sha256 differs from the published {spec.sha256}")
        return found
    if not offline():
        try:
            return fetch(spec, root)
        except Exception as error:  # no network, gated repo, ...: fall through to the message
            reason = f" (download failed: {type(error).__name__}: {error})"
    else:
        reason = " (HF_HUB_OFFLINE=1: no download attempted)"
    where = f"{root / spec.folder}/" if root else f"${ENV}/{spec.folder}/ (or the Hugging Face cache)"
    source = f"hub repo {spec.repo}" if spec.repo else spec.url
    return f"{metric} needs {', '.join(spec.names)} from {source} in {where}{reason}"


def resolve_all(metric: str, specs: Sequence[WeightFiles], weights_dir: str | Path | None = None) -> list[Path]:
    """The folder of each spec (see the module docstring for the search order); one
    :class:`MissingWeights` naming every missing file and the fetch command."""
    root = weights_root(weights_dir)
    results = [_find_or_fetch(metric, spec, root) for spec in specs]
    if missing := [result for result in results if isinstance(result, str)]:
        raise MissingWeights("; ".join(missing) + f". Fetch them with: {fetch_command(metric, root)}")
    return results


def resolve(metric: str, spec: WeightFiles, weights_dir: str | Path | None = None) -> Path:
    """:func:`resolve_all` of one spec."""
    (folder,) = resolve_all(metric, (spec,), weights_dir)
    return folder


# ---------------------------------------------------------------- shipped checkpoints
# The toy world's checkpoints ship as package data: ``<name>.safetensors``, a model card ``<name>.md``
# (command, seed, hardware, wall time, final metrics) and a line in ``SHA256SUMS``; :func:`packaged`
# verifies the hash before anything reads the file, so a truncated or edited checkpoint fails loudly.

# package data beside the toy world that trained them; a path, so this module imports nothing above it
SHIPPED_ROOT = Path(__file__).resolve().parent / "toyworld" / "weights"
SUMS = SHIPPED_ROOT / "SHA256SUMS"


class WeightsError(RtdmdError, FileNotFoundError):
    """A shipped checkpoint that is unknown, missing or modified."""


def expected_sha256() -> dict[str, str]:
    """``{file name: sha256}`` from ``SHA256SUMS`` (``sha256sum`` format)."""
    if not SUMS.is_file():
        return {}
    pairs = (line.split() for line in SUMS.read_text().splitlines() if line.strip())
    return {name.lstrip("*"): digest for digest, name in pairs}


def packaged(name: str) -> Path:
    """The verified path of shipped checkpoint ``name`` (without ``.safetensors``)."""
    file = f"{name}.safetensors"
    path, sums = SHIPPED_ROOT / file, expected_sha256()
    if file not in sums:
        known = ", ".join(sorted(n.removesuffix(".safetensors") for n in sums)) or "none"
        raise WeightsError(f"no shipped toy checkpoint {name!r} (shipped: {known})")
    if not path.is_file():
        raise WeightsError(f"shipped toy checkpoint {path} is missing: reinstall rtdmd or restore it from git")
    if (actual := sha256_of(path)) != sums[file]:
        raise WeightsError(f"{path} has sha256 {actual}, SHA256SUMS expects {sums[file]} (a modified checkpoint)")
    return path


def register(path: Path) -> str:
    """Copy a trained checkpoint into the package and record its sha256 (used when shipping)."""
    target = SHIPPED_ROOT / path.name
    if path.resolve() != target.resolve():
        write_bytes_atomic(target, path.read_bytes())
    sums = expected_sha256() | {target.name: sha256_of(target)}
    write_text_atomic(SUMS, "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    return sums[target.name]
