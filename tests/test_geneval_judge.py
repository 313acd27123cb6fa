"""GenEval judging rules (metrics.md §8.3-8.7), one test per rule, boundaries included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rtdmd.geneval.judge import Detection, judge, relative_position, summarize


def det(label, box=(10, 10, 20, 20), score=0.95, color=None, mask=None):
    return Detection(label=label, box=box, score=score, color=color, mask=mask)


def meta(tag, include, exclude=()):
    return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": "p"}


SINGLE = meta("single_object", [{"class": "cat", "count": 1}])


# ---------------------------------------------------------------- thresholds and the cap


def test_threshold_is_strictly_greater_than_0_3():
    assert not judge(SINGLE, [det("cat", score=0.3)]).correct
    assert judge(SINGLE, [det("cat", score=0.3000001)]).correct


def test_counting_uses_0_9_for_every_class():
    counting = meta("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
    assert not judge(counting, [det("cat", score=0.95), det("cat", score=0.9)]).correct
    assert judge(counting, [det("cat", score=0.95), det("cat", score=0.9001)]).correct
    # the same detections under another tag pass at 0.3
    two = meta("two_object", [{"class": "cat", "count": 2}])
    assert judge(two, [det("cat", score=0.95), det("cat", score=0.5)]).correct


def test_at_most_16_detections_per_class_are_kept():
    many = [det("cat", box=(i, 0, i + 1, 1), score=0.5 + i / 100) for i in range(20)]
    verdict = judge(
        meta("counting", [{"class": "cat", "count": 17}]),
        [Detection("cat", d.box, 0.95 + i / 1000) for i, d in enumerate(many)],
    )
    assert not verdict.correct and len(verdict.detected["cat"]) == 16
    # exclude counts only the kept 16: 20 cats do not trip an exclude of 17
    excl = meta("counting", [{"class": "cat", "count": 16}], [{"class": "cat", "count": 17}])
    assert judge(excl, [Detection("cat", d.box, 0.95 + i / 1000) for i, d in enumerate(many)]).correct
    assert [b[0] for b in verdict.detected["cat"]][:2] == [19.0, 18.0]  # highest scores first


# ---------------------------------------------------------------- counting and exclude


def test_counting_with_exclude_means_exactly_n():
    counting = meta("counting", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
    assert judge(counting, [det("cat"), det("cat")]).correct
    assert not judge(counting, [det("cat")] * 3).correct
    assert "expected cat<3, found 3" in judge(counting, [det("cat")] * 3).reason
    assert not judge(counting, [det("cat")]).correct
    # a low-confidence third cat is dropped by the 0.9 threshold, so it does not count
    assert judge(counting, [det("cat"), det("cat"), det("cat", score=0.8)]).correct


def test_include_at_least_n_without_exclude_and_other_classes_ignored():
    two = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert judge(two, [det("cat"), det("dog"), det("dog"), det("horse")]).correct
    verdict = judge(two, [det("cat")])
    assert not verdict.correct and "expected dog>=1, found 0" in verdict.reason


# ---------------------------------------------------------------- colours


def test_colour_counts_all_found_objects():
    colors = meta("colors", [{"class": "cat", "count": 1, "color": "red"}])
    assert judge(colors, [det("cat", color="red")]).correct
    assert not judge(colors, [det("cat", color="blue")]).correct
    two_red = meta("counting", [{"class": "cat", "count": 2, "color": "red"}])
    assert not judge(two_red, [det("cat", color="red"), det("cat", color="blue")]).correct
    # only the top-count detections are classified: a third, lower-scored blue cat does not matter
    assert judge(
        two_red,
        [
            det("cat", color="red", score=0.99),
            det("cat", color="red", score=0.98),
            det("cat", color="blue", score=0.97),
        ],
    ).correct


def test_colour_classifier_sees_the_masked_crop_on_grey():
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:18, 12:18] = True
    seen = []

    def classifier(crops, classname):
        seen.append((classname, [np.array(c) for c in crops]))
        return ["red" for _ in crops]

    colors = meta("colors", [{"class": "cat", "count": 1, "color": "red"}])
    assert judge(
        colors, [det("cat", box=(10, 10, 20, 20), mask=mask)], image=image, color_classifier=classifier
    ).correct
    name, crops = seen[0]
    assert name == "cat" and crops[0].shape == (10, 10, 3)
    assert tuple(crops[0][0, 0]) == (153, 153, 153) and tuple(crops[0][5, 5]) == (255, 0, 0)
    with pytest.raises(ValueError, match="colour classifier"):
        judge(colors, [det("cat")])


# ---------------------------------------------------------------- positions


def test_every_relation_and_the_margin():
    b = det("b", box=(40, 40, 60, 60))
    assert relative_position(det("a", box=(0, 40, 20, 60)), b) == {"left of"}
    assert relative_position(det("a", box=(80, 40, 100, 60)), b) == {"right of"}
    assert relative_position(det("a", box=(40, 0, 60, 20)), b) == {"above"}
    assert relative_position(det("a", box=(40, 80, 60, 100)), b) == {"below"}
    # centres 4 px apart with sizes 20 + 20: the margin 0.1 x 40 = 4 px eats the offset entirely
    assert relative_position(det("a", box=(36, 40, 56, 60)), b) == set()
    # then dx = (|o| - 4) / |o| must fall below -0.5: |o| = 8 is the boundary (dx = -0.5, no relation)
    assert relative_position(det("a", box=(32, 40, 52, 60)), b) == set()
    assert relative_position(det("a", box=(31.8, 40, 51.8, 60)), b) == {"left of"}


def test_diagonal_offsets_can_hold_two_relations():
    b = det("b", box=(100, 100, 110, 110))
    assert relative_position(det("a", box=(0, 0, 10, 10)), b) == {"left of", "above"}


def test_position_clause_checks_every_pair_and_needs_its_target():
    pos = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    dog = det("dog", box=(60, 40, 80, 60))
    assert judge(pos, [dog, det("cat", box=(0, 40, 20, 60))]).correct
    wrong = judge(pos, [dog, det("cat", box=(100, 40, 120, 60))])
    assert not wrong.correct and "expected cat left of target" in wrong.reason
    missing = judge(pos, [det("cat", box=(0, 40, 20, 60))])
    assert not missing.correct and "no target for cat to be left of" in missing.reason


# ---------------------------------------------------------------- strict and partial variants


def test_strict_needs_exact_counts_and_ignores_exclude():
    two = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    extra = judge(two, [det("cat"), det("dog"), det("dog")])
    assert extra.correct and not extra.strict_correct
    assert extra.partial == pytest.approx((1 + 0) / 2)  # dog: 1 - |1 - 2| / 1 = 0
    exact = judge(two, [det("cat"), det("dog")])
    assert exact.strict_correct and exact.partial == 1.0


def test_partial_credit_terms_including_the_position_quirk():
    colors = meta("colors", [{"class": "cat", "count": 2, "color": "red"}])
    half = judge(colors, [det("cat", color="red"), det("cat", color="blue")])
    assert half.partial == pytest.approx((1 + 0.5) / 2)
    none = judge(colors, [det("cat", color="red")])
    assert none.partial == pytest.approx((0.5 + 0) / 2)  # count failed: the colour term is 0
    pos = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    ok = judge(pos, [det("dog", box=(60, 40, 80, 60)), det("cat", box=(0, 40, 20, 60))])
    assert ok.partial == 1.0  # terms 1, 1, 1
    bad = judge(pos, [det("dog", box=(60, 40, 80, 60)), det("cat", box=(100, 40, 120, 60))])
    assert bad.partial == pytest.approx((1 + 1 + 0 + 1) / 4)  # a failed position still appends the 1.0
    no_target = judge(pos, [det("cat", box=(0, 40, 20, 60))])
    assert no_target.partial == pytest.approx((0 + 1 + 0) / 3)


# ---------------------------------------------------------------- aggregation


def test_overall_score_is_the_mean_over_tasks_not_over_images():
    rows = [{"tag": "single_object", "correct": True, "metadata": json.dumps({"p": i})} for i in range(3)]
    rows += [{"tag": "counting", "correct": i == 0, "metadata": json.dumps({"q": i})} for i in range(2)]
    result, text = summarize(rows)
    assert result["overall"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["image_accuracy"] == pytest.approx(4 / 5)
    assert "Overall score (avg. over tasks): 0.75000" in text
    assert "single_object    = 100.00% (3 / 3)" in text and "% correct prompts: 80.00%" in text


def test_reasons_are_the_official_texts():
    two_red = meta("counting", [{"class": "cat", "count": 2, "color": "red"}])
    verdict = judge(two_red, [det("cat", color="red"), det("cat", box=(30, 30, 40, 40), color="blue")])
    assert verdict.reason == "expected red cat>=2, found 1 red; and 1 red, 1 blue"
    # overlapping boxes: no relation at all, so the official join of an empty set leaves two spaces
    left = meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    assert judge(left, [det("dog"), det("cat")]).reason == "expected cat left of target, found  target"
    far = [det("dog", box=(0, 0, 10, 10)), det("cat", box=(50, 50, 60, 60))]
    assert judge(left, far).reason == "expected cat left of target, found below and right of target"
