"""The toy prompt suites shipped as package data, their cards, and packaged prompt files for training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.request

import pytest

import rtdmd.suites
from rtdmd.config import ConfigError, from_dict
from rtdmd.data import read_prompt_file
from rtdmd.suites import SuiteError, SuiteFile, load_card, load_suite
from rtdmd.toyworld import suites as toy_suites
from rtdmd.toyworld.prompts import TAGS

CARDS = {"toy-geneval": "toy_geneval.jsonl", "toy-train": "toy_train.jsonl"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty download cache and no network: a suite must come from the package alone."""

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(rtdmd.suites, "CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def test_regenerating_the_suite_files_gives_the_committed_bytes_and_the_cards_hashes(tmp_path):
    digests = toy_suites.write(tmp_path)
    for card_name, file_name in CARDS.items():
        committed = (toy_suites.SUITES_DIR / file_name).read_bytes()
        assert (tmp_path / file_name).read_bytes() == committed, f"{file_name} changed: rerun the generator"
        (entry,) = load_card(card_name).files
        assert (entry.package, entry.path) == ("rtdmd.toyworld", f"suites/{file_name}")
        assert digests[file_name] == hashlib.sha256(committed).hexdigest() == entry.sha256


def test_suite_files_use_genevals_metadata_format():
    for file_name in CARDS.values():
        for line in (toy_suites.SUITES_DIR / file_name).read_text().splitlines():
            row = json.loads(line)
            assert line == json.dumps(row)  # json.dumps default separators, as in evaluation_metadata.jsonl
            assert list(row) in (["tag", "include", "prompt"], ["tag", "include", "exclude", "prompt"])
            assert row["tag"] in TAGS


def test_training_prompts_are_distinct_and_hold_out_the_evaluation_compositions(offline):
    from rtdmd.toyworld.prompts import composition

    train = [r["prompt"] for r in load_suite("toy-train").rows]
    train_compositions = {composition(json.loads(r["metadata"])) for r in load_suite("toy-train").rows}
    evaluation = load_suite("toy-geneval").rows
    assert len(train) == len(set(train)) == toy_suites.TRAIN_PROMPTS
    assert len(evaluation) == 116
    held = {composition(json.loads(r["metadata"])) for r in evaluation} - {None}
    assert len(held) == 116 - 8 - 24 and not held & train_compositions
    # single objects and counts are vocabulary: the training prompts include them
    vocabulary = {r["prompt"] for r in evaluation if r["category"] in ("single_object", "counting")}
    assert len(vocabulary) == 32 and vocabulary <= set(train)
    # the stream's first distinct prompts, in stream order
    assert train[0] == toy_suites.train_metadata(0, 0)["prompt"]


def test_toy_geneval_loads_without_prompts_dir_or_network(offline):
    suite = load_suite("toy-geneval", prompts_dir=None, download=True)
    card = suite.card
    assert len(suite.rows) == card.rows == 116 and card.redistribute and card.licence == "Apache-2.0"
    assert card.images_per_prompt == 12 and load_card("toy-geneval-quick").images_per_prompt == 1
    assert card.default_metrics == ("toy-geneval", "toy-clip", "toy-aesthetic", "toy-fd")
    assert [r["category"] for r in suite.rows] == [json.loads(r["metadata"])["tag"] for r in suite.rows]
    assert list(dict.fromkeys(r["category"] for r in suite.rows)) == list(TAGS)
    counting = next(json.loads(r["metadata"]) for r in suite.rows if r["category"] == "counting")
    assert set(counting) == {"tag", "include", "exclude"}


def test_a_packaged_file_that_does_not_match_its_card_fails_clearly(offline, monkeypatch):
    card = load_card("toy-geneval")
    wrong = dataclasses.replace(card, files=(dataclasses.replace(card.files[0], sha256="0" * 64),))
    monkeypatch.setattr(rtdmd.suites, "load_card", lambda name: wrong)
    with pytest.raises(SuiteError, match=r"packaged file rtdmd.toyworld/suites/toy_geneval.jsonl has sha256 41e88830"):
        load_suite("toy-geneval")
    missing = dataclasses.replace(card, files=(dataclasses.replace(card.files[0], path="suites/nope.jsonl"),))
    monkeypatch.setattr(rtdmd.suites, "load_card", lambda name: missing)
    with pytest.raises(SuiteError, match="is missing; regenerate it with `python -m rtdmd.toyworld.suites`"):
        load_suite("toy-geneval")


def test_a_packaged_suite_file_must_be_pinned():
    with pytest.raises(ConfigError, match="give its sha256 and no url"):
        from_dict(SuiteFile, {"path": "suites/x.jsonl", "package": "rtdmd.toyworld"})
    with pytest.raises(ConfigError, match="give its sha256 and no url"):
        from_dict(SuiteFile, {"path": "x.jsonl", "package": "rtdmd", "sha256": "a" * 64, "url": "https://x"})


# ---------------------------------------------------------------- prompt files for training


def test_prompt_files_may_be_jsonl_and_packaged(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  two stars \n")
    assert read_prompt_file(text) == ["a red circle", "two stars"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"tag": "x", "prompt": " a red circle "}\n\n{"prompt": "two stars", "id": 3}\n')
    assert read_prompt_file(str(lines)) == ["a red circle", "two stars"]
    packaged = read_prompt_file("package:rtdmd.toyworld/suites/toy_train.jsonl", load_card("toy-train").files[0].sha256)
    rows = (toy_suites.SUITES_DIR / "toy_train.jsonl").read_text().splitlines()
    assert packaged == [json.loads(r)["prompt"] for r in rows] and len(packaged) == 2000
    with pytest.raises(ValueError, match="sha256"):
        read_prompt_file("package:rtdmd.toyworld/suites/toy_train.jsonl", "0" * 64)


@pytest.mark.parametrize(
    ("source", "error", "message"),
    [
        (
            "package:rtdmd.no_such_pkg/x.jsonl",
            FileNotFoundError,
            "'rtdmd.no_such_pkg' is not an installed Python package",
        ),
        ("package:rtdmd.toyworld/suites/none.jsonl", FileNotFoundError, "does not exist"),
        ("package:rtdmd.toyworld", ValueError, "expected package:<python.package>/<relative path>"),
    ],
)
def test_bad_packaged_prompt_files_fail_clearly(source, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_prompt_file(source)


def test_a_jsonl_prompt_file_needs_a_prompt_on_every_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"caption": "no prompt"}\n')
    with pytest.raises(ValueError, match='bad.jsonl: record 2 has no "prompt"'):
        read_prompt_file(path)
