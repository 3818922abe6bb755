"""Metrics against hand-computed values, including a class never predicted and invalid generations."""

from __future__ import annotations

import json

import pytest

from minilora.metrics import classification_metrics

LABELS = ["positive", "neutral", "negative"]


def test_hand_computed_with_never_predicted_class_and_invalid():
    gold = ["positive", "positive", "positive", "neutral", "neutral", "negative", "negative", "negative"]
    pred = ["positive", "positive", "neutral", "neutral", "positive", "neutral", "neutral", "bullish"]
    m = classification_metrics(gold, pred, LABELS)
    # rows gold, columns positive / neutral / negative / invalid
    assert m["confusion_columns"] == LABELS + ["invalid"]
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 2, 0, 1]]
    assert m["accuracy"] == pytest.approx(3 / 8)
    pos, neu, neg = (m["per_class"][label] for label in LABELS)
    assert (pos["precision"], pos["recall"], pos["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (neu["precision"], neu["recall"], neu["f1"]) == pytest.approx((1 / 4, 1 / 2, 1 / 3))
    assert (neg["precision"], neg["recall"], neg["f1"]) == (0.0, 0.0, 0.0)  # never predicted: 0, not NaN
    assert [c["support"] for c in (pos, neu, neg)] == [3, 2, 3]
    assert [c["predicted"] for c in (pos, neu, neg)] == [3, 4, 0]
    assert m["macro_f1"] == pytest.approx(1 / 3)
    assert m["weighted_f1"] == pytest.approx((2 / 3 * 3 + 1 / 3 * 2 + 0 * 3) / 8)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1 / 4) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert (m["n"], m["n_invalid"], m["invalid_rate"]) == (8, 1, pytest.approx(1 / 8))
    assert m["invalid_by_gold"] == {"positive": 0, "neutral": 0, "negative": 1}


def test_unequal_f1_weighting_and_no_invalid_column():
    gold = ["positive"] * 4 + ["negative"] * 2
    pred = ["positive", "positive", "positive", "negative", "negative", "positive"]
    m = classification_metrics(gold, pred, ["positive", "negative"])
    assert m["confusion_columns"] == ["positive", "negative"]  # no invalid prediction, no column
    assert m["confusion_matrix"] == [[3, 1], [1, 1]]
    # positive: P 3/4 R 3/4 F1 3/4; negative: P 1/2 R 1/2 F1 1/2
    assert m["macro_f1"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["weighted_f1"] == pytest.approx((3 / 4 * 4 + 1 / 2 * 2) / 6)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["n_invalid"] == 0


def test_all_invalid_and_class_absent_from_gold():
    m = classification_metrics(["neutral", "neutral"], ["", "Neutral"], LABELS)  # exact match only
    assert m["accuracy"] == 0.0 and m["n_invalid"] == 2
    assert m["confusion_matrix"] == [[0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]]
    assert m["per_class"]["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    m = classification_metrics(["neutral"], ["positive"], LABELS, invalid_label="other")
    assert m["per_class"]["positive"]["precision"] == 0.0 and m["confusion_columns"] == LABELS


def test_perfect_predictions_and_json_round_trip():
    gold = ["positive", "neutral", "negative", "neutral"]
    m = classification_metrics(gold, list(gold), LABELS)
    assert m["accuracy"] == m["macro_f1"] == m["weighted_f1"] == 1.0
    assert json.loads(json.dumps(m)) == m


@pytest.mark.parametrize(
    "gold, pred, labels, invalid, match",
    [
        (["positive"], [], LABELS, "invalid", "gold has 1 items, predicted has 0"),
        ([], [], LABELS, "invalid", "no examples"),
        (["bullish"], ["positive"], LABELS, "invalid", r"gold\[0\] is 'bullish'"),
        (["positive"], ["positive"], LABELS, "neutral", "invalid_label 'neutral' is also a label"),
        (["positive"], ["positive"], ["positive", "positive"], "invalid", "distinct"),
    ],
)
def test_bad_inputs_raise(gold, pred, labels, invalid, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(gold, pred, labels, invalid_label=invalid)
