"""The project's ``prompts/``: one Hugging Face dataset folder per packaged suite, equal to what
``rtdmd-bench suites export`` writes, loadable offline with ``datasets.load_dataset`` and by the harness,
and checked against the suite card (rows, upstream sha256, licence)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from typer.testing import CliRunner

from bench.cli import app
from rtdmd import suites as suites_module
from rtdmd.suite_export import ExportError, check_push, export_suite, push_to_hub
from rtdmd.suites import ROW_KEYS, SuiteError, card_names, load_card, load_suite

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "prompts"
PROMPTS = ROOT / "prompts"
REDISTRIBUTABLE = [n for n in card_names() if load_card(n).redistribute]
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/prompts is not checked out beside the project")


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    """An empty download cache, so a suite can come only from a dataset folder (or fail)."""
    monkeypatch.setattr(suites_module, "CACHE", tmp_path / "empty-cache")


def test_every_card_has_its_folder():
    assert sorted(p.name for p in PROMPTS.iterdir() if p.is_dir()) == card_names()


@pytest.mark.parametrize("name", card_names())
def test_the_committed_folder_is_what_export_writes(name, tmp_path, monkeypatch):
    """tools/export_prompts.sh rewrites prompts/: a card or loader change that is not re-exported fails here.
    Exported from the upstream files where ../shared/prompts is checked out, else from the folders
    themselves (hash-checked against the card)."""
    monkeypatch.setenv(suites_module.PROMPTS_ENV, str(PROMPTS))
    export_suite(load_card(name), tmp_path / name, SHARED if SHARED.exists() else None, download=False)
    assert files_of(tmp_path / name) == files_of(PROMPTS / name)


@pytest.mark.parametrize("name", REDISTRIBUTABLE)
def test_load_dataset_offline_gives_the_cards_rows(name, monkeypatch):
    """The folder's rows against the card (count, rows sha256, upstream hashes, licence) and, where
    ../shared/prompts is checked out, against the rows its upstream files parse into."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    card = load_card(name)
    ds = datasets.load_dataset(str(PROMPTS / name), split=card.split)
    assert len(ds) == card.rows
    if SHARED.exists():
        upstream = load_suite(name, SHARED, download=False)
        assert [dict(r) for r in ds] == [{k: row[k] for k in ROW_KEYS} for row in upstream.rows]
    data = (PROMPTS / name / "data" / f"{card.split}.jsonl").read_bytes()
    assert hashlib.sha256(data).hexdigest() == card.rows_sha256
    header = front_matter(PROMPTS / name)
    assert header["dataset_info"]["splits"] == [{"name": card.split, "num_examples": card.rows}]
    text = (PROMPTS / name / "README.md").read_text()
    assert all(f.sha256 in text for f in card.files) and f"suite version: {card.version}" in text
    if card.licence_file is not None:
        assert hashlib.sha256((PROMPTS / name / "LICENSE").read_bytes()).hexdigest() == card.licence_file.sha256


def test_the_project_folder_is_found_beside_the_package_or_through_the_environment(monkeypatch):
    """A checkout or an editable install finds prompts/ beside the package; a wheel (as tox installs
    it) through $RTDMD_PROMPTS, which tox sets to the checkout's prompts/."""
    monkeypatch.setenv(suites_module.PROMPTS_ENV, str(PROMPTS))
    assert suites_module.project_prompts()[0] == PROMPTS
    monkeypatch.delenv(suites_module.PROMPTS_ENV)
    beside = Path(suites_module.__file__).resolve().parents[1] / "prompts"
    assert suites_module.project_prompts() == [beside]


@pytest.mark.parametrize("name", ["geneval", "partiprompts", "toy-train"])
def test_the_harness_reads_the_project_folder_offline(name, no_cache, monkeypatch):
    """No --prompts-dir, no cache, no network: the suite comes from prompts/<name>, with the same
    fingerprint as its upstream files give (so manifests and score caches match either way)."""
    monkeypatch.setenv(suites_module.PROMPTS_ENV, str(PROMPTS))  # found as a wheel install finds it
    suite = load_suite(name, download=False)
    card = load_card(name)
    assert len(suite.rows) == card.rows
    expected = hashlib.sha256("\n".join(sorted(f.sha256 for f in card.files)).encode()).hexdigest()
    assert suite.sha256 == expected
    if SHARED.exists():
        assert suite.rows == load_suite(name, SHARED, download=False).rows


def test_a_modified_folder_is_refused(tmp_path, no_cache):
    folder = tmp_path / "geneval"
    shutil.copytree(PROMPTS / "geneval", folder)
    data = folder / "data" / "test.jsonl"
    data.write_text(data.read_text().replace("a photo of a bench", "a photo of a bank", 1))
    with pytest.raises(SuiteError, match="has sha256 .* the card expects"):
        load_suite("geneval", tmp_path, download=False)


def test_a_folder_a_card_cannot_be_read_from_is_no_source(tmp_path, no_cache, monkeypatch):
    """Without the project's folder, the cache or the network, the error says where the file is expected."""
    monkeypatch.setattr(suites_module, "PROJECT_PROMPTS", tmp_path / "none")
    monkeypatch.delenv(suites_module.PROMPTS_ENV, raising=False)
    with pytest.raises(SuiteError, match="is not in"):
        load_suite("geneval", tmp_path, download=False)


def test_non_redistributable_suites_keep_a_card_only(tmp_path):
    for name in ("drawbench", "hpsv3_subset", "hpdv2"):
        assert files_of(PROMPTS / name).keys() == {"README.md"}
        assert "does not allow redistributing" in (PROMPTS / name / "README.md").read_text()
        with pytest.raises(ExportError, match="may not be redistributed"):
            check_push(load_card(name))
    result = CliRunner().invoke(app, ["suites", "export", "drawbench", str(tmp_path / "d"), "--push-to-hub", "me/x"])
    assert result.exit_code == 2 and not (tmp_path / "d").exists()


def test_push_to_hub_uploads_the_folder_as_a_dataset(monkeypatch):
    """Not exercised against the Hub here (no network, no token): the calls it makes are checked."""
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    push_to_hub(load_card("geneval"), PROMPTS / "geneval", "me/geneval", private=True)
    assert calls[0] == ("create", "me/geneval", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(PROMPTS / "geneval") and calls[1][1]["repo_type"] == "dataset"


def test_a_hub_suite_pins_the_commit_its_revision_resolved_to(tmp_path, monkeypatch):
    """``hub:owner/name@rev``: the snapshot's commit is the suite's version; an exported folder keeps its
    prompt ids and metadata (GenEval's include lists) through the Hub."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "snapshots" / commit
    shutil.copytree(PROMPTS / "toy-geneval", snapshot)
    asked = {}

    def fake_snapshot_download(repo_id, repo_type, revision):
        asked.update(repo_id=repo_id, repo_type=repo_type, revision=revision)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    suite = load_suite("hub:me/toy@0123456", images_per_prompt=2)
    assert asked == {"repo_id": "me/toy", "repo_type": "dataset", "revision": "0123456"}
    assert suite.card.version == f"hub:me/toy@{commit}" and suite.sha256 == commit
    assert "pinned at" in suite.card.description
    packaged = load_suite("toy-geneval")
    assert [(r["prompt_id"], r["metadata"], r["category"]) for r in suite.rows] == [
        (r["prompt_id"], r["metadata"], r["category"]) for r in packaged.rows
    ]
    unpinned = load_suite("hub:me/toy")
    assert "pass @" + commit in unpinned.card.description
