"""Classify a split with a (fine-tuned) model and write the report: the code behind eval.py and the
evaluation that ends train.py.

Two methods: `score` (default) compares log p(label | prompt) across labels and never answers
outside the label set; `generate` decodes greedily with the KV cache and parses the first word,
counting anything else as `invalid`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .data import Example
from .generate import generate, parse_label
from .int8 import int8_for_inference
from .lora import merged_for_inference
from .metrics import classification_metrics
from .model import CausalLM
from .prompts import PromptFormatter
from .report import write_report
from .scoring import check_context, label_logprobs, predict_labels

METHODS = ("score", "generate")
INT8_CALIBRATION_ROWS = 32  # fp32 rows that calibrate int8 (`int8`); 16 moved the log-probabilities 1.5x as much


@dataclass
class Predictions:
    predicted: list[str]
    logprobs: torch.Tensor | None  # (N, n_labels) natural-log probabilities of each label's tokens
    seconds: float
    generated: list[str] | None = None  # `generate`: each decoded answer, before label parsing


def predict(
    model: CausalLM,
    formatter: PromptFormatter,
    texts: list[str],
    method: str = "score",
    batch_size: int = 16,
    share_prefix: bool = True,
    max_new_tokens: int | None = None,
    merged: bool = True,
    int8: bool = False,
) -> Predictions:
    """Labels for `texts` (and, for `score`, the per-label log-probabilities). merged: run adapters on
    dense fp32 bases merged into copies of their weights (`lora.merged_for_inference`): faster, at the
    cost of one extra copy of the adapted weights while it runs. int8: the first INT8_CALIBRATION_ROWS
    texts (at most half of them) run as usual and calibrate the rest, which run with int8 projections
    (`int8.int8_for_inference`)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if batch_size < 1:
        raise ValueError(f"batch size (--batch-size) must be >= 1, found {batch_size}")
    if max_new_tokens is None:  # the longest label, with room for a quote, a full stop or a space
        max_new_tokens = max(4, max(len(ids) for ids in formatter.label_ids.values()) + 3)
    run = partial(_predict, model, formatter, method=method, batch_size=batch_size, share_prefix=share_prefix,
                  max_new_tokens=max_new_tokens)
    started = time.perf_counter()  # the merge and the calibration count: this evaluation costs them
    with merged_for_inference(model) if merged else nullcontext():
        calibration_rows = min(INT8_CALIBRATION_ROWS, len(texts) // 2) if int8 else 0
        if calibration_rows:
            # the calibration rows are not spent: their fp32 results are part of the answer
            calibrated: list[tuple] = []
            with int8_for_inference(model, lambda: calibrated.append(run(texts[:calibration_rows]))):
                rest = run(texts[calibration_rows:])
            predicted, logprobs, generated = _concatenated(calibrated[0], rest)
        else:
            predicted, logprobs, generated = run(texts)
    return Predictions(predicted, logprobs, time.perf_counter() - started, generated)


def _concatenated(first: tuple, second: tuple) -> tuple:
    """Two `_predict` results, one after the other."""
    return tuple(None if a is None else a + b if isinstance(a, list) else torch.cat((a, b))
                 for a, b in zip(first, second))


def _predict(model: CausalLM, formatter: PromptFormatter, texts: list[str], *, method: str, batch_size: int,
             share_prefix: bool, max_new_tokens: int) -> tuple[list[str], torch.Tensor | None, list[str] | None]:
    if method == "score":
        logprobs = label_logprobs(model, formatter, texts, batch_size=batch_size, share_prefix=share_prefix)
        return predict_labels(logprobs, formatter.labels), logprobs, None
    stop_ids = {formatter.stop_id, formatter.tokenizer.eos_id} | formatter.tokenizer.newline_ids
    prompts = [formatter.prompt_ids(t) for t in texts]
    check_context(model, prompts, texts, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths per batch
    generated = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        outputs = generate(model, [prompts[i] for i in idx], max_new_tokens, stop_ids, formatter.tokenizer.pad_id)
        for i, ids in zip(idx, outputs):
            generated[i] = formatter.tokenizer.decode(ids)
    return [parse_label(answer, formatter.labels) for answer in generated], None, generated


def evaluate(
    model: CausalLM,
    formatter: PromptFormatter,
    examples: list[Example],
    out_dir: str | Path,
    run_name: str,
    method: str = "score",
    batch_size: int = 16,
    share_prefix: bool = True,
    meta: dict | None = None,
    merged: bool = True,
    int8: bool = False,
) -> dict:
    """Predict, compute metrics and write report.json, predictions.csv, confusion_matrix.png, summary.md.
    merged: as `predict` (False: the adapters run as trained, e.g. as the reference a merge is checked against).
    int8: as `predict`."""
    texts = [ex.text for ex in examples]
    gold = [ex.label for ex in examples]
    result = predict(model, formatter, texts, method, batch_size, share_prefix, merged=merged, int8=int8)
    metrics = classification_metrics(gold, result.predicted, formatter.labels)
    metrics["examples_per_s"] = len(texts) / result.seconds if result.seconds > 0 else None
    logprobs = result.logprobs.numpy() if result.logprobs is not None else None
    write_report(out_dir, run_name, metrics, texts, gold, result.predicted, logprobs=logprobs,
                 wall_time_s=result.seconds, meta={"method": method, **(meta or {})}, generated=result.generated)
    metrics["wall_time_s"] = result.seconds
    metrics["predicted"] = result.predicted
    return metrics
