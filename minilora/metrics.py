"""Classification metrics for label predictions, with invalid generations kept in their own column.

A prediction that is not exactly one of the labels (a free generation such as "bullish" or "")
counts as wrong and lands in an extra `invalid` confusion-matrix column; it is never mapped to
"neutral" (that inflates neutral recall). Normalise case / whitespace upstream,
where the answer is parsed. Zero division gives 0.0 (a class never predicted has precision 0),
as sklearn's ``zero_division=0``. numpy only; every value returned is a plain int / float / list
so the dict goes straight into JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _safe_div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _safe_div(2 * precision * recall, precision + recall)


def confusion_matrix(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str], invalid_label: str = "invalid"
) -> tuple[np.ndarray, list[str]]:
    """Counts with rows = gold labels, columns = labels (+ `invalid_label` if any prediction is not a label)."""
    column = {label: j for j, label in enumerate(labels)}
    invalid = [p not in column for p in predicted]
    columns = list(labels) + ([invalid_label] if any(invalid) else [])
    matrix = np.zeros((len(labels), len(columns)), dtype=np.int64)  # (n_labels, n_columns)
    for g, p, bad in zip(gold, predicted, invalid):
        matrix[column[g], len(labels) if bad else column[p]] += 1
    return matrix, columns


def _check_inputs(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str], invalid_label: str) -> None:
    if len(gold) != len(predicted):
        raise ValueError(f"gold has {len(gold)} items, predicted has {len(predicted)}; expected equal lengths")
    if not gold:
        raise ValueError("no examples: gold and predicted are empty")
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be a non-empty list of distinct names, found {list(labels)}")
    if invalid_label in labels:
        raise ValueError(f"invalid_label {invalid_label!r} is also a label in {list(labels)}")
    for i, g in enumerate(gold):
        if g not in labels:
            raise ValueError(f"gold[{i}] is {g!r}, expected one of {list(labels)}")


def classification_metrics(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str], invalid_label: str = "invalid"
) -> dict:
    """Accuracy, per-class precision / recall / F1 / support, macro and weighted F1, confusion matrix.

    Returns a JSON-ready dict: `accuracy`, `macro_f1`, `weighted_f1`, `macro_precision`,
    `macro_recall`, `per_class` {label: {precision, recall, f1, support, predicted}},
    `confusion_matrix` (rows `labels`, columns `confusion_columns`), `n`, `n_invalid`,
    `invalid_rate`, `invalid_by_gold` {label: count}, `labels`.
    """
    labels = list(labels)
    _check_inputs(gold, predicted, labels, invalid_label)
    matrix, columns = confusion_matrix(gold, predicted, labels, invalid_label)
    n = len(gold)
    true_pos = np.diag(matrix[:, : len(labels)])  # (n_labels,)
    support = matrix.sum(axis=1)  # row sums include invalid predictions: they are still misses
    predicted_count = matrix[:, : len(labels)].sum(axis=0)  # invalid predictions belong to no class
    per_class = {}
    for j, label in enumerate(labels):
        precision = _safe_div(true_pos[j], predicted_count[j])
        recall = _safe_div(true_pos[j], support[j])
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": int(support[j]),
            "predicted": int(predicted_count[j]),
        }
    f1s = np.array([per_class[label]["f1"] for label in labels])
    n_invalid = int(matrix[:, len(labels):].sum())
    return {
        "n": n,
        "labels": labels,
        "accuracy": _safe_div(true_pos.sum(), n),
        "macro_precision": float(np.mean([per_class[label]["precision"] for label in labels])),
        "macro_recall": float(np.mean([per_class[label]["recall"] for label in labels])),
        "macro_f1": float(f1s.mean()),
        "weighted_f1": _safe_div(float((f1s * support).sum()), n),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "confusion_columns": columns,
        "n_invalid": n_invalid,
        "invalid_rate": _safe_div(n_invalid, n),
        "invalid_by_gold": {
            label: int(matrix[j, len(labels):].sum()) for j, label in enumerate(labels)
        },
    }
