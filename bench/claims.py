"""Claims: statements about a leaderboard, checked from its numbers and printed in the report.

A claim card (``bench/cards/claims/<name>.yaml`` or a YAML path) lists comparisons such as "AC-DMD
at 4 steps is within 0.05 of the teacher on toy GenEval": ``left op right`` where each side is a
method's metric value (or one category's value of a category-averaged metric), times ``factor``
plus ``offset``, or a constant. The report states each claim as held, not
held, or not checkable (a method or metric missing), so the aims of an experiment are judged by
the same run that produced the numbers, never by hand.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from bench.methods import card_names as method_names
from rtdmd.config import ConfigError, from_dict, yaml_mapping
from rtdmd.errors import RtdmdError
from rtdmd.registry import did_you_mean
from rtdmd.rewards import REWARDS

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class ClaimError(RtdmdError, ValueError):
    pass


@dataclass(frozen=True)
class Operand:
    """``factor * v + offset`` with ``v`` = ``summary[method].metrics[metric].value`` (or its
    ``per_category[category]``), or the constant ``value``."""

    method: str = ""
    metric: str = ""
    category: str = ""  # one category of a category-averaged metric (e.g. a GenEval task)
    value: float | None = None
    factor: float = 1.0
    offset: float = 0.0

    def validate(self) -> None:
        named = bool(self.method or self.metric or self.category)
        if (self.value is not None) == named or (named and not (self.method and self.metric)):
            raise ValueError("an operand is either {method, metric[, category, factor, offset]} or {value}")
        if self.value is not None and (self.factor != 1.0 or self.offset != 0.0):
            raise ValueError("a constant operand takes no factor or offset (write the result as the value)")

    def text(self) -> str:
        if self.value is not None:
            return f"{self.value:g}"
        name = f"{self.method} {self.metric}" + (f"[{self.category}]" if self.category else "")
        scaled = f"{'' if self.factor == 1 else f'{self.factor:g} x '}{name}"
        return scaled if not self.offset else f"{scaled} {'+' if self.offset > 0 else '-'} {abs(self.offset):g}"


@dataclass(frozen=True)
class Claim:
    text: str
    left: Operand
    op: Literal[">=", ">", "<=", "<"]
    right: Operand


@dataclass(frozen=True)
class ClaimCard:
    name: str
    description: str
    suites: tuple[str, ...]  # the suites whose reports it judges (e.g. a full protocol and its quick profile)
    claims: tuple[Claim, ...]


def card_names() -> list[str]:
    root = resources.files("bench") / "cards" / "claims"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_claims(name_or_path: str) -> ClaimCard:
    packaged = resources.files("bench") / "cards" / "claims" / f"{name_or_path}.yaml"
    path = packaged if packaged.is_file() else Path(name_or_path)
    if not path.is_file():
        raise ClaimError(f"unknown claim card {name_or_path!r}{did_you_mean(name_or_path, card_names())}")
    try:
        card = from_dict(ClaimCard, yaml_mapping(path.read_text(), "the file"))
    except ConfigError as error:
        raise ClaimError(f"claim card {name_or_path}: {error}") from None
    check_names(card)
    return card


def check_names(card: ClaimCard) -> None:
    """Every metric must be registered and every method a known card: a typo would otherwise read
    as "not checkable" forever."""

    methods = method_names()
    for claim in card.claims:
        for operand in (claim.left, claim.right):
            if operand.value is not None:
                continue
            REWARDS.get(operand.metric)  # unknown names raise with a did-you-mean
            if operand.method not in methods and not Path(operand.method).suffix:
                raise ClaimError(
                    f"claim {claim.text!r}: unknown method {operand.method!r}{did_you_mean(operand.method, methods)}"
                )


def operand_value(operand: Operand, summaries: dict[str, dict]) -> float | None:
    if operand.value is not None:
        return operand.value
    entry = summaries.get(operand.method, {}).get("metrics", {}).get(operand.metric)
    if entry is None:
        return None
    value = entry.get("per_category", {}).get(operand.category) if operand.category else entry["value"]
    if value is None or not math.isfinite(value):
        return None  # missing or NaN: not checkable rather than "not held"
    return operand.factor * value + operand.offset


def check(card: ClaimCard, summaries: list[dict]) -> list[dict]:
    """One row per claim: the two sides' values and ``held`` (True, False, or None = not checkable)."""
    runs = [s for s in summaries if s["suite"]["name"] in card.suites]
    by_method = {s["method"]["name"]: s for s in runs}
    named = {o.method for claim in card.claims for o in (claim.left, claim.right) if o.method}
    for name in sorted(named):
        dirs = [s["run_dir"] for s in runs if s["method"]["name"] == name]
        if len(dirs) > 1:
            raise ClaimError(
                f"claim card {card.name}: method {name} has {len(dirs)} runs in this report ({', '.join(dirs)}); "
                "a claim compares one run per method: report them apart, or evaluate several seeds in one run (--seeds)"
            )
    rows = []
    for claim in card.claims:
        left, right = operand_value(claim.left, by_method), operand_value(claim.right, by_method)
        held = None if left is None or right is None else bool(OPS[claim.op](left, right))
        rows.append(
            {
                "claim": claim.text,
                "test": f"{claim.left.text()} {claim.op} {claim.right.text()}",
                "left": left,
                "right": right,
                "held": held,
            }
        )
    return rows


def claims_section(card: ClaimCard, rows: list[dict]) -> list[str]:
    """The report's markdown for a claim card; rows tested by :func:`bench.claim_stats.significance`
    also show the difference, its interval and the adjusted one-sided p-value."""
    show = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    verdict = {True: "held", False: "**not held**", None: "not checkable (missing)"}
    tested = any("p_value" in r for r in rows)
    head = (
        "| Claim | Test | Left | Right | Verdict |"
        if not tested
        else ("| Claim | Test | Left | Right | Left - right [95%] | p (one-sided, Holm) | Verdict |")
    )
    lines = [
        f"## Claims: {card.name}",
        "",
        card.description,
        "",
        head,
        "|---|---|---:|---:|" + "---:|" * 2 * tested + "---|",
    ]
    for row in rows:
        cells = [row["claim"], f"`{row['test']}`", show(row["left"]), show(row["right"])]
        text = verdict[row["held"]]
        if tested:
            has_p = row.get("p_holm") is not None
            interval = f"{row['diff']:+.4g} [{row['ci_low']:+.4g}, {row['ci_high']:+.4g}]" if has_p else "—"
            cells += [interval, f"{row['p_holm']:.2g}" if has_p else "—"]
            if has_p and row["held"]:
                text += ", significant" if row["significant"] else ", not significant"
        lines.append("| " + " | ".join([*cells, text]) + " |")
    held = sum(r["held"] is True for r in rows)
    summary = f"{held} of {len(rows)} claims held"
    if tested:
        significant = sum(bool(r.get("significant")) and r["held"] is True for r in rows)
        summary += (
            f", {significant} of them significantly (one-sided bootstrap p-value of the claimed direction, "
            f"adjusted by Holm's method over the {sum(r.get('p_holm') is not None for r in rows)} tested claims, <= 0.05)"
        )
    return [*lines, "", summary + "."]
