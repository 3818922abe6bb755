"""Evaluation output folder: report.json, predictions.csv, confusion_matrix.png, summary.md.

`write_report` writes one run; `comparison_table` renders several runs (baseline vs adapters) as a
Markdown pipe table whose columns are padded, so the same string reads well in a terminal. Every
file is written to a temp file in the same folder and moved into place with os.replace, so a
crash never leaves a half-written report. The plot uses matplotlib's Agg canvas directly (no
pyplot global state), so it works headless and from threads.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def current_umask() -> int:
    """The process's umask, read without setting it where Linux shows it: os.umask(0), the only other way,
    opens a moment in which other threads create world-writable files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` via a temp file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it owner-only; a report is as readable as any file
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _logprob_columns(logprobs, labels: list[str], n: int) -> dict[str, list[float]]:
    """Accept {label: values} or an (n, n_labels) array in `labels` order; return {label: values}."""
    if isinstance(logprobs, Mapping):
        columns = {label: [float(v) for v in values] for label, values in logprobs.items()}
    else:
        array = np.asarray(logprobs, dtype=np.float64)
        if array.shape != (n, len(labels)):
            raise ValueError(f"logprobs has shape {array.shape}, expected ({n}, {len(labels)}) in label order {labels}")
        columns = {label: array[:, j].tolist() for j, label in enumerate(labels)}
    for label, values in columns.items():
        if len(values) != n:
            raise ValueError(f"logprobs[{label!r}] has {len(values)} values, expected {n} (one per example)")
    return columns


def predictions_csv(
    texts: Sequence[str],
    gold: Sequence[str],
    predicted: Sequence[str],
    logprobs: Mapping[str, Sequence[float]] | None = None,
    generated: Sequence[str] | None = None,
) -> str:
    """CSV text with columns text, gold, predicted, then generated (the decoded answer a label was
    parsed from, when given: it shows what an invalid answer said) and logprob_<label> per label
    (csv-module quoting)."""
    buffer = io.StringIO()
    # RFC 4180's \r\n: the csv module quotes only fields holding a line terminator's characters, so with
    # "\n" a text with a lone \r went out unquoted, and readers split its row in two
    writer = csv.writer(buffer, lineterminator="\r\n")
    names = list(logprobs or {})
    extra = ["generated"] if generated is not None else []
    writer.writerow(["text", "gold", "predicted"] + extra + [f"logprob_{label}" for label in names])
    for i, row in enumerate(zip(texts, gold, predicted)):
        answer = [generated[i]] if generated is not None else []
        writer.writerow(list(row) + answer + [repr(float(logprobs[label][i])) for label in names])
    return buffer.getvalue()


def plot_confusion_matrix(metrics: dict, run_name: str) -> bytes:
    """PNG bytes of the confusion matrix: counts and row percentages in cells, labelled axes."""
    # imported here: matplotlib costs ~40 MB of resident memory, which a training run should not carry
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    matrix = np.array(metrics["confusion_matrix"])  # (n_labels, n_columns)
    rows, columns = metrics["labels"], metrics["confusion_columns"]
    fig = Figure(figsize=(1.6 * len(columns) + 2.4, 1.3 * len(rows) + 2.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, ticks=MaxNLocator(integer=True))  # counts are whole
    row_totals = matrix.sum(axis=1, keepdims=True)
    percent = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0) * 100
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        colour = "white" if count > threshold else "black"
        ax.text(j, i, f"{count}\n{percent[i, j]:.0f}%", ha="center", va="center", color=colour, fontsize=11)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted label   (cells: count, % of gold row)")
    ax.set_ylabel("gold label")
    headline = f"accuracy {metrics['accuracy']:.1%}, macro F1 {metrics['macro_f1']:.3f} (n={metrics['n']})"
    ax.set_title(f"{run_name}\n{headline}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """Pipe table with padded columns: valid Markdown and aligned in a monospace terminal."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    header = [str(c).replace("|", "\\|") for c in header]  # a '|' in a name would split the cell
    rows = [[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    widths = [max(w, 3) for w in widths]

    def line(cells: list[str]) -> str:
        padded = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if a == "l" else "-" * (w - 1) + ":" for w, a in zip(widths, align)]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |"] + [line(r) for r in rows])


def summary_markdown(report: dict) -> str:
    """Markdown summary of one run: headline numbers, per-class table, confusion matrix, meta."""
    m = report["metrics"]
    speed = report.get("examples_per_s")
    lines = [
        f"# {report['run_name']}",
        "",
        _markdown_table(
            ["metric", "value"],
            [
                ["examples", str(m["n"])],
                ["accuracy", f"{m['accuracy']:.4f}"],
                ["macro F1", f"{m['macro_f1']:.4f}"],
                ["weighted F1", f"{m['weighted_f1']:.4f}"],
                ["invalid predictions", f"{m['n_invalid']} ({m['invalid_rate']:.1%})"],
                ["examples/s", "-" if speed is None else f"{speed:.2f}"],
                ["wall time (s)", "-" if report.get("wall_time_s") is None else f"{report['wall_time_s']:.1f}"],
            ],
        ),
        "",
        "## Per class",
        "",
        _markdown_table(
            ["label", "precision", "recall", "F1", "support", "predicted"],
            [
                [label, *(f"{c[k]:.4f}" for k in ("precision", "recall", "f1")), str(c["support"]), str(c["predicted"])]
                for label, c in m["per_class"].items()
            ],
        ),
        "",
        "## Confusion matrix (rows gold, columns predicted)",
        "",
        _markdown_table(
            ["gold \\ predicted"] + m["confusion_columns"],
            [[label] + [str(v) for v in row] for label, row in zip(m["labels"], m["confusion_matrix"])],
        ),
    ]
    if report.get("meta"):
        lines += ["", "## Run", ""]
        meta_rows = [[str(k), str(v)] for k, v in report["meta"].items()]
        lines.append(_markdown_table(["key", "value"], meta_rows, ["l", "l"]))
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    run_name: str,
    metrics: dict,
    texts: Sequence[str],
    gold: Sequence[str],
    predicted: Sequence[str],
    logprobs: Mapping[str, Sequence[float]] | np.ndarray | None = None,
    wall_time_s: float | None = None,
    meta: dict | None = None,
    generated: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write report.json, predictions.csv, confusion_matrix.png and summary.md into `out_dir`.

    `metrics` comes from `classification_metrics`; `logprobs` is {label: values} or an
    (n, n_labels) array in `metrics["labels"]` order; `generated` is the decoded answer of each row
    (method `generate`); `meta` (model, adapter, seed, ...) is copied into report.json and
    summary.md. Returns the written paths by name.
    """
    n = len(texts)
    if not (n == len(gold) == len(predicted) == metrics["n"]):
        raise ValueError(
            f"texts / gold / predicted have {n} / {len(gold)} / {len(predicted)} items, "
            f"metrics['n'] is {metrics['n']}; expected equal"
        )
    if generated is not None and len(generated) != n:
        raise ValueError(f"generated has {len(generated)} answers, expected {n} (one per example)")
    columns = None if logprobs is None else _logprob_columns(logprobs, list(metrics["labels"]), n)
    report = {
        "run_name": run_name,
        "n_examples": n,
        "wall_time_s": wall_time_s,
        "examples_per_s": (n / wall_time_s) if wall_time_s else None,
        "metrics": metrics,
        "meta": meta or {},
    }
    out = Path(out_dir)
    table = predictions_csv(texts, gold, predicted, columns, generated)
    written = {
        "report": atomic_write(out / "report.json", json.dumps(report, indent=2, default=str) + "\n"),
        "predictions": atomic_write(out / "predictions.csv", table),
    }
    try:
        picture = plot_confusion_matrix(metrics, run_name)
        written["confusion_matrix"] = atomic_write(out / "confusion_matrix.png", picture)
    except ImportError as err:  # a broken matplotlib costs the picture, not the evaluation
        (out / "confusion_matrix.png").unlink(missing_ok=True)  # an earlier evaluation's, which would mislead
        print(f"note: no confusion_matrix.png in {out} (matplotlib: {err})", file=sys.stderr)
    written["summary"] = atomic_write(out / "summary.md", summary_markdown(report))
    return written


def _as_metrics(run: dict) -> tuple[dict, float | None]:
    """Accept a report.json dict or a bare metrics dict (optionally with `examples_per_s`)."""
    if "metrics" in run:
        return run["metrics"], run.get("examples_per_s")
    return run, run.get("examples_per_s")


def comparison_table(runs: Mapping[str, dict]) -> str:
    """Side-by-side table of runs, the first being the baseline.

    Columns: accuracy, its change vs the baseline, macro F1, per-class F1, invalid count, examples/s.
    `runs` maps a name to a report.json dict or a `classification_metrics` dict.
    """
    if not runs:
        raise ValueError("comparison_table: no runs given")
    parsed = {name: _as_metrics(run) for name, run in runs.items()}
    labels: list[str] = []
    for metrics, _ in parsed.values():
        labels += [label for label in metrics["labels"] if label not in labels]
    base_name, (base, _) = next(iter(parsed.items()))
    header = ["run", "accuracy", f"Δ acc vs {base_name}", "macro F1"] + [f"F1 {label}" for label in labels]
    header += ["invalid", "examples/s"]
    rows = []
    for name, (m, speed) in parsed.items():
        f1 = [f"{m['per_class'][label]['f1']:.4f}" if label in m["per_class"] else "-" for label in labels]
        delta = f"{m['accuracy'] - base['accuracy']:+.4f}"
        speed_cell = "-" if speed is None else f"{speed:.2f}"
        head = [name, f"{m['accuracy']:.4f}", delta, f"{m['macro_f1']:.4f}"]
        rows.append(head + f1 + [str(m["n_invalid"]), speed_cell])
    return _markdown_table(header, rows)
