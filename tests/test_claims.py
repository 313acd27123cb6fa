"""Claim cards: comparisons checked from summaries and stated in the report."""

from __future__ import annotations

import pytest

from bench.claims import ClaimCard, ClaimError, check, claims_section, load_claims
from rtdmd.config import ConfigError, from_dict


def summary(method: str, **values: float) -> dict:
    return {
        "method": {"name": method},
        "suite": {"name": "s"},
        "run_dir": f"runs/{method}/s",
        "metrics": {metric.replace("_", "-"): {"value": v} for metric, v in values.items()},
    }


CARD = {
    "name": "t",
    "description": "test claims",
    "suites": ["s"],
    "claims": [
        {"text": "a is good", "left": {"method": "a", "metric": "m"}, "op": ">=", "right": {"value": 0.8}},
        {
            "text": "a within 10% of b",
            "left": {"method": "a", "metric": "m"},
            "op": ">=",
            "right": {"method": "b", "metric": "m", "factor": 0.9},
        },
        {
            "text": "a lower fd",
            "left": {"method": "a", "metric": "fd"},
            "op": "<",
            "right": {"method": "b", "metric": "fd"},
        },
        {"text": "c exists", "left": {"method": "c", "metric": "m"}, "op": ">", "right": {"value": 0.0}},
    ],
}


def test_claims_are_checked_with_factors_and_missing_values():
    card = from_dict(ClaimCard, CARD)
    rows = check(card, [summary("a", m=0.85, fd=3.0), summary("b", m=0.95, fd=3.0)])
    assert [r["held"] for r in rows] == [True, False, False, None]
    assert rows[1]["right"] == pytest.approx(0.855) and rows[1]["test"] == "a m >= 0.9 x b m"
    text = "\n".join(claims_section(card, rows))
    assert "**not held**" in text and "not checkable" in text and "1 of 4 claims held." in text


def test_operands_read_one_category_and_add_an_offset():
    card = from_dict(
        ClaimCard,
        {
            **CARD,
            "claims": [
                {
                    "text": "a counts well",
                    "left": {"method": "a", "metric": "m", "category": "counting"},
                    "op": ">=",
                    "right": {"value": 0.6},
                },
                {
                    "text": "a within 0.05 of b",
                    "left": {"method": "a", "metric": "m"},
                    "op": ">=",
                    "right": {"method": "b", "metric": "m", "offset": -0.05},
                },
                {
                    "text": "a has a task it lacks",
                    "left": {"method": "a", "metric": "m", "category": "position"},
                    "op": ">=",
                    "right": {"value": 0.0},
                },
            ],
        },
    )
    a, b = summary("a", m=0.85), summary("b", m=0.88)
    a["metrics"]["m"]["per_category"] = {"counting": 0.55}
    rows = check(card, [a, b])
    assert [r["held"] for r in rows] == [False, True, None]
    assert rows[0]["left"] == 0.55 and rows[1]["right"] == pytest.approx(0.83)
    assert rows[0]["test"] == "a m[counting] >= 0.6" and rows[1]["test"] == "a m >= b m - 0.05"
    with pytest.raises(ConfigError, match="offset"):
        from_dict(ClaimCard, {**CARD, "claims": [{**CARD["claims"][0], "right": {"value": 1.0, "offset": 1.0}}]})


def test_a_summary_of_another_suite_does_not_count():
    card = from_dict(ClaimCard, CARD)
    other = summary("a", m=0.99) | {"suite": {"name": "other"}}
    assert check(card, [other])[0]["held"] is None


def test_malformed_operands_and_unknown_cards_are_refused():
    bad = {**CARD, "claims": [{**CARD["claims"][0], "right": {"value": 1.0, "method": "b", "metric": "m"}}]}
    with pytest.raises(ConfigError, match="either"):
        from_dict(ClaimCard, bad)
    with pytest.raises(ConfigError, match="no factor"):
        from_dict(ClaimCard, {**CARD, "claims": [{**CARD["claims"][0], "right": {"value": 0.8, "factor": 2.0}}]})
    with pytest.raises(ClaimError, match="unknown claim card 'tyo'.*toy"):
        load_claims("tyo")


def test_typos_in_a_claim_card_fail_at_load(tmp_path):
    import yaml

    from rtdmd.registry import UnknownNameError

    card = {**CARD, "claims": [{**CARD["claims"][0], "left": {"method": "toy-acdmd", "metric": "toy-genevl"}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(UnknownNameError, match="toy-geneval"):
        load_claims(str(tmp_path / "c.yaml"))
    card["claims"][0]["left"] = {"method": "toy-acdm", "metric": "toy-geneval"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(ClaimError, match="unknown method 'toy-acdm'.*toy-acdmd"):
        load_claims(str(tmp_path / "c.yaml"))


def test_a_nan_value_is_not_checkable():
    card = from_dict(ClaimCard, CARD)
    assert check(card, [summary("a", m=float("nan")), summary("b", m=0.5)])[0]["held"] is None


def test_the_toy_claims_name_the_toy_methods_and_metrics():
    from bench.plan import DEFAULT_RUN

    card = load_claims(DEFAULT_RUN.claims)
    methods = {c.left.method for c in card.claims} | {c.right.method for c in card.claims} - {""}
    assert (
        methods - {""} <= set(DEFAULT_RUN.methods) and DEFAULT_RUN.suite in card.suites and "toy-geneval" in card.suites
    )
