"""Report folder: files exist, CSV and JSON round-trip, PNG is a sensible image, comparison table."""

from __future__ import annotations

import csv
import json
import os
import struct

import numpy as np
import pytest

from minilora.metrics import classification_metrics
from minilora.report import atomic_write, comparison_table, write_report

LABELS = ["positive", "neutral", "negative"]
# a lone \r (kept by the CSV / JSONL readers) went out unquoted and split its row in two
TEXTS = ['Profit rose, "sharply" .', "Sales flat ; outlook 'unclear'", "Loss\nwidened , again", "Ok\rthen"]
GOLD = ["positive", "neutral", "negative", "neutral"]
PRED = ["positive", "neutral", "neutral", "maybe"]


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


@pytest.fixture
def written(tmp_path):
    metrics = classification_metrics(GOLD, PRED, LABELS)
    logprobs = {label: [-0.1 * (i + 1) - j / 3 for i in range(4)] for j, label in enumerate(LABELS)}
    paths = write_report(
        tmp_path / "eval", "gemma3 | lora r8", metrics, TEXTS, GOLD, PRED, logprobs,
        wall_time_s=2.0, meta={"model": "gemma-3-270m", "seed": 42},
    )
    return metrics, logprobs, paths


def test_files_exist_and_no_temp_left(written):
    _, _, paths = written
    folder = paths["report"].parent
    expected = ["confusion_matrix.png", "predictions.csv", "report.json", "summary.md"]
    assert sorted(p.name for p in folder.iterdir()) == expected


def test_json_round_trip(written):
    metrics, _, paths = written
    report = json.loads(paths["report"].read_text())
    assert report["metrics"] == metrics
    assert report["examples_per_s"] == 2.0 and report["wall_time_s"] == 2.0 and report["n_examples"] == 4
    assert report["meta"] == {"model": "gemma-3-270m", "seed": 42} and report["run_name"] == "gemma3 | lora r8"


def test_predictions_csv_round_trip(written):
    _, logprobs, paths = written
    with paths["predictions"].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["text", "gold", "predicted", "logprob_positive", "logprob_neutral", "logprob_negative"]
    assert [(r["text"], r["gold"], r["predicted"]) for r in rows] == list(zip(TEXTS, GOLD, PRED))
    for label in LABELS:
        assert [float(r[f"logprob_{label}"]) for r in rows] == logprobs[label]  # exact: repr round-trips


def test_logprobs_array_and_none(tmp_path):
    metrics = classification_metrics(GOLD, PRED, LABELS)
    array = np.arange(12, dtype=float).reshape(4, 3)
    paths = write_report(tmp_path / "a", "run", metrics, TEXTS, GOLD, PRED, array)
    with paths["predictions"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["logprob_negative"]) for r in rows] == [2.0, 5.0, 8.0, 11.0]
    assert json.loads(paths["report"].read_text())["examples_per_s"] is None
    paths = write_report(tmp_path / "b", "run", metrics, TEXTS, GOLD, PRED)
    assert paths["predictions"].read_text().splitlines()[0] == "text,gold,predicted"
    with pytest.raises(ValueError, match=r"expected \(4, 3\)"):
        write_report(tmp_path / "c", "run", metrics, TEXTS, GOLD, PRED, array[:, :2])
    with pytest.raises(ValueError, match="equal"):
        write_report(tmp_path / "d", "run", metrics, TEXTS[:3], GOLD, PRED)


def test_generated_answers_column(tmp_path):
    metrics = classification_metrics(GOLD, PRED, LABELS)
    answers = ["Positive.", ' "neutral"', "neutral, I think", "maybe,\nmaybe not"]  # quotes, commas, newline
    paths = write_report(tmp_path / "a", "run", metrics, TEXTS, GOLD, PRED, generated=answers)
    with paths["predictions"].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["text", "gold", "predicted", "generated"]
    assert [r["generated"] for r in rows] == answers
    with pytest.raises(ValueError, match="generated has 3 answers, expected 4"):
        write_report(tmp_path / "b", "run", metrics, TEXTS, GOLD, PRED, generated=answers[:3])


def test_png_is_valid_and_sensible_size(written):
    _, _, paths = written
    width, height = _png_size(paths["confusion_matrix"])
    assert 400 <= width <= 2000 and 300 <= height <= 2000
    assert paths["confusion_matrix"].stat().st_size > 10_000  # has text and colour, not a blank canvas


def test_summary_markdown(written):
    _, _, paths = written
    summary = paths["summary"].read_text()
    assert summary.startswith("# gemma3 | lora r8")
    assert "| accuracy            |    0.5000 |" in summary
    assert "| neutral          |        0 |       1 |        0 |       1 |" in summary  # confusion row with invalid
    assert "| model | gemma-3-270m |" in summary


def test_comparison_table(written):
    metrics, _, paths = written
    better = classification_metrics(GOLD, GOLD, LABELS)
    table = comparison_table({"baseline": metrics, "lora|r8": json.loads(paths["report"].read_text()), "best": better})
    lines = table.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1  # aligned in a terminal
    assert lines[0].split("|")[1:-1] == [
        " run      ", " accuracy ", " Δ acc vs baseline ", " macro F1 ", " F1 positive ",
        " F1 neutral ", " F1 negative ", " invalid ", " examples/s ",
    ]
    assert lines[2].startswith("| baseline |   0.5000 |           +0.0000 |")
    assert "lora\\|r8" in lines[3] and lines[3].endswith("|       1 |       2.00 |")
    assert "+0.5000" in lines[4] and lines[4].endswith("|       0 |          - |")
    with pytest.raises(ValueError):
        comparison_table({})


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    path = atomic_write(tmp_path / "x" / "f.txt", "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["f.txt"]


def test_reports_are_as_readable_as_any_file_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "report.json", "{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0o600


def test_a_broken_matplotlib_costs_the_picture_only(tmp_path, monkeypatch, capsys):
    import sys

    metrics = classification_metrics(GOLD, PRED, LABELS)
    write_report(tmp_path, "run", metrics, TEXTS, GOLD, PRED)  # an earlier evaluation's picture
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # importing it raises ImportError
    paths = write_report(tmp_path, "run", metrics, TEXTS, GOLD, PRED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "report.json", "summary.md"]
    assert set(paths) == {"report", "predictions", "summary"}
    assert "note: no confusion_matrix.png" in capsys.readouterr().err
