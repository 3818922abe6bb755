"""Baseline vs fine-tuned: evaluate the base model and each adapter on one split, side by side.

The code behind eval.py. The base model is loaded once; each adapter is injected, evaluated (and,
with check_merge, merged and evaluated again: merging must not change predictions), then removed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data as data_mod
from .adapter_io import base_model_check, check_adapter_folder, load_adapter
from .device import cpu_has_fast_int8, pick_device, pick_dtype
from .evaluate import INT8_CALIBRATION_ROWS, evaluate, predict
from .finetune import build_model, make_formatter, note_label_set, opt, subset_rows
from .lora import lora_modules, merge_adapters, remove_adapters
from .prompts import load_template
from .quant import dequantize_nf4
from .report import atomic_write, comparison_table
from .run_folder import resolved_setting, tokens_fingerprint


@dataclass
class EvalConfig:
    """eval.py's flags."""

    model: str = opt("gemma-3-270m", "Hub id, local HF folder, or packaged short name")
    adapter: list[str] = field(default_factory=list, metadata={"help": "adapter folder(s) to compare with the base"})
    baseline: bool = opt(True, "evaluate the base model alone as well")
    data: str | None = opt(None, "same forms as train.py --data")
    labels: str = opt(",".join(data_mod.DEFAULT_LABELS), "the label set, comma-separated (as in training)")
    agreement: str = opt("50", "FinancialPhraseBank agreement level", choices=["50", "66", "75", "all"])
    split_protocol: str = opt("seed", "seed or standard (1,212 test rows)", choices=["seed", "standard"])
    train_per_class: int = opt(300, "seed protocol: training rows per class")
    test_per_class: int = opt(300, "seed protocol: test rows per class")
    skip_bad_rows: bool = opt(False, "drop bad rows instead of stopping (use the training run's setting)")
    seed: int = opt(42, "seed of the split (use the training run's)")
    split: str = opt("test", "which split to evaluate", choices=["train", "validation", "test"])
    limit: int = opt(0, "evaluate a seeded random subset of N rows (0: all)")
    method: str = opt("score", "score: label log-probabilities; generate: greedy decoding", choices=["score", "generate"])
    batch_size: int = opt(16, "rows per forward pass")
    prompt_template: str | None = opt(None, "prompt template file with one {text} slot (as in training)")
    prompt_format: str = opt("auto", "auto, chat or plain (as in training)", choices=["auto", "chat", "plain"])
    qlora: bool = opt(False, "load the base in NF4 (for adapters trained with --qlora)")
    check_merge: bool = opt(False, "also evaluate each adapter merged into the base and report differences")
    int8: bool = opt(False, f"run the decoder's projections in int8 (faster on CPUs with VNNI; the first "
                            f"{INT8_CALIBRATION_ROWS} rows run as usual and calibrate it; see minilora/int8.py)")
    output_dir: str = opt("runs/eval", "where reports go (one subfolder per run)")
    device: str = opt("auto", "cpu, cuda or auto")
    dtype: str = opt("auto", "auto, fp32 or bf16")


def _training_run(adapter_dir: str) -> tuple[Path, dict, dict] | None:
    """(run folder, run_config.json, data_info.json) of an adapter that train.py wrote (<run>/adapter,
    best or checkpoint); None for any other adapter folder (a peft one)."""
    run_dir = Path(adapter_dir).resolve().parent
    try:
        run = json.loads((run_dir / "run_config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        info = json.loads((run_dir / "data_info.json").read_text())
    except (OSError, ValueError):
        info = {}
    return run_dir, run, info


def check_against_training_run(adapter_dir: str, cfg: EvalConfig, examples: list, data_info, log) -> None:
    """An adapter of a training run: refuse to evaluate it on rows it was trained on (another --seed,
    --split-protocol or --data than the run's makes another split), and note settings that differ."""
    found = _training_run(adapter_dir)
    if found is None:
        return
    run_dir, run, info = found
    if data_mod.parse_label_set(run.get("labels", cfg.labels)) != data_info.labels:
        log(f"note: {adapter_dir} was trained with the labels {run.get('labels')!r}, this evaluation uses "
            f"{cfg.labels!r}")
    for key in ("prompt_format", "qlora"):  # "auto" may or may not mean chat: the token check below tells
        if run.get(key, getattr(cfg, key)) != getattr(cfg, key) and "auto" not in (run[key], getattr(cfg, key)):
            log(f"note: {adapter_dir} was trained with --{key.replace('_', '-')} {run[key]!r}, this evaluation "
                f"uses {getattr(cfg, key)!r}")
    if cfg.split == "train":  # asked for
        return
    if info.get("sha256") == data_info.sha256:  # the same file as this evaluation's, wherever it lies now
        source = cfg.data
    else:
        source = resolved_setting("data", run.get("data"), Path(run.get("cwd", ".")))
        edited = source is not None and Path(source).is_file() and info.get("sha256") not in (
            None, data_mod.file_sha256(source))
        if edited:
            log(f"note: {source}, which {adapter_dir} was trained on, changed since; whether the evaluated rows "
                "hold its training rows could not be checked")
            return
    try:
        trained = data_mod.load_dataset(
            source, agreement=run.get("agreement", "50"), protocol=run.get("split_protocol", "seed"),
            train_per_class=run.get("train_per_class", 300), test_per_class=run.get("test_per_class", 300),
            seed=run.get("seed", 42), labels=data_mod.parse_label_set(run.get("labels", cfg.labels)),
            skip_bad_rows=run.get("skip_bad_rows", False))
    except (ValueError, OSError) as err:  # the run's data moved, or no Hub: say what could not be checked
        log(f"note: could not rebuild the training split of {adapter_dir} to check that no evaluated row is "
            f"in it ({err})")
        return
    texts = {example.text for example in trained.train}
    overlap = sum(example.text in texts for example in examples)
    if overlap:
        raise ValueError(
            f"{overlap} of the {len(examples)} {cfg.split} rows are training rows of {adapter_dir}, whose run "
            f"split its data with protocol {trained.info.protocol} and seed {run.get('seed')} (data "
            f"{run.get('data')}); evaluate with the run's settings (see {run_dir / 'run_config.json'})")


def note_other_tokens(adapter_dir: str, formatter, log) -> None:
    """The prompts and labels of this evaluation tokenize as in the adapter's training run (template,
    prompt format, tokenizer and minilora version all in one)."""
    found = _training_run(adapter_dir)
    recorded = found[1].get("prompt_tokens_sha256") if found else None
    if recorded not in (None, tokens_fingerprint(formatter)):
        log(f"note: {adapter_dir} was trained on other prompt or label tokens than this evaluation's (another "
            "--prompt-template, --prompt-format or --labels?); its scores here may not be what it learned")


def run_comparison(cfg: EvalConfig, log=print) -> dict[str, dict]:
    if not cfg.adapter and not cfg.baseline:
        raise ValueError("nothing to evaluate: give --adapter DIR and/or keep --baseline")
    if cfg.int8 and cfg.check_merge:  # in int8 both passes would run the same merged int8 weights
        raise ValueError("--check-merge compares the adapters as trained with their merge; run it without --int8")
    if cfg.limit < 0:
        raise ValueError(f"--limit must be >= 0 (0: all rows), found {cfg.limit}")
    load_template(cfg.prompt_template)  # a bad template file is found before the model loads
    for adapter_dir in cfg.adapter:  # every folder before anything is evaluated
        check_adapter_folder(adapter_dir, config_check=base_model_check(cfg.model))
    device = pick_device(cfg.device)
    dtype = pick_dtype(device, cfg.dtype)
    if cfg.int8 and device.type == "cpu" and not cpu_has_fast_int8():
        log("note: this CPU has no VNNI / AMX int8 instructions: --int8 will likely be slower than fp32 here")
    splits = data_mod.load_dataset(cfg.data, agreement=cfg.agreement, protocol=cfg.split_protocol,
                                   train_per_class=cfg.train_per_class, test_per_class=cfg.test_per_class, seed=cfg.seed,
                                   labels=data_mod.parse_label_set(cfg.labels), skip_bad_rows=cfg.skip_bad_rows)
    note_label_set(splits.info.labels, cfg.prompt_template, log)
    examples = getattr(splits, cfg.split)
    examples = subset_rows(examples, cfg.limit, cfg.seed)
    if not examples:
        raise ValueError(f"the {cfg.split} split is empty")
    for adapter_dir in cfg.adapter:
        check_against_training_run(adapter_dir, cfg, examples, splits.info, log)
    loaded, tokenizer = build_model(cfg.model, device, dtype, cfg.qlora)
    model = loaded.model
    formatter = make_formatter(tokenizer, cfg.prompt_format, cfg.prompt_template, splits.info.labels)
    for adapter_dir in cfg.adapter:
        note_other_tokens(adapter_dir, formatter, log)
    out = Path(cfg.output_dir)
    meta = {"model": cfg.model, "data": cfg.data, "labels": list(splits.info.labels), "split": cfg.split,
            "split_protocol": splits.info.protocol, "seed": cfg.seed, "rows": len(examples), "limit": cfg.limit,
            "prompt_format": "chat" if formatter.chat else "plain", "prompt_template": cfg.prompt_template,
            "int8": cfg.int8}
    log(f"evaluating {len(examples)} {cfg.split} rows of {cfg.model} with method {cfg.method!r}"
        + (" and int8 projections" if cfg.int8 else ""))

    def one(name: str, adapter: str | None, merged: bool = True) -> dict:
        metrics = evaluate(model, formatter, examples, out / name, name, method=cfg.method,
                           batch_size=cfg.batch_size, meta={**meta, "adapter": adapter}, merged=merged, int8=cfg.int8)
        log(f"{name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
            f"{metrics['examples_per_s']:.1f} examples/s")
        return metrics

    # one untimed pass first, so that one-time costs (first kernels, allocations) do not land in the
    # first run's examples/s; it is 100x on a tiny model, a few % on a real one
    predict(model, formatter, [ex.text for ex in examples[:2]], cfg.method, cfg.batch_size, int8=cfg.int8)
    results: dict[str, dict] = {}
    if cfg.baseline:
        results["baseline"] = one("baseline", None)
    merge_notes = {}
    for index, adapter_dir in enumerate(cfg.adapter):
        name = Path(adapter_dir).resolve().name if len(cfg.adapter) == 1 else f"adapter{index + 1}-{Path(adapter_dir).name}"
        if name == "baseline" or name.endswith("-merged"):  # would take another run's report folder and row
            name = f"adapter-{name}"
        load_adapter(model, adapter_dir, config_check=base_model_check(cfg.model))
        # with check_merge this pass is the reference: the adapters as trained, not merged for speed
        results[name] = one(name, adapter_dir, merged=not cfg.check_merge)
        if cfg.check_merge:
            if cfg.qlora:  # merge onto the NF4 weights the adapter was trained against, dequantized
                dequantize_nf4(model, dtype)
            else:  # unmerging leaves rounding drift (1e-3 in bf16): the next adapter gets these back
                originals = {where: layer.base_layer.weight.detach().clone() for where, layer in lora_modules(model)}
            merge_adapters(model)
            merged = one(name + "-merged", adapter_dir)
            results[name + "-merged"] = merged
            differing = sum(a != b for a, b in zip(results[name]["predicted"], merged["predicted"]))
            merge_notes[name] = {"rows_with_different_prediction": differing,
                                 "accuracy_unmerged": results[name]["accuracy"], "accuracy_merged": merged["accuracy"]}
            log(f"{name}: merging changed {differing} of {len(examples)} predictions")
        remove_adapters(model)
        if cfg.check_merge and cfg.qlora:  # the base was dequantized: reload it for the next adapter
            loaded, _ = build_model(cfg.model, device, dtype, cfg.qlora)
            model = loaded.model
        elif cfg.check_merge:
            with torch.no_grad():
                for where, weight in originals.items():
                    model.get_submodule(where).weight.copy_(weight)

    table = comparison_table({name: m for name, m in results.items()})
    method = cfg.method + (", int8 projections" if cfg.int8 else "")
    summary = f"# Evaluation of {cfg.model} on the {cfg.split} split ({len(examples)} rows, method {method})\n\n{table}\n"
    if merge_notes:
        summary += "\n## Merge check\n\n" + "\n".join(f"- {k}: {json.dumps(v)}" for k, v in merge_notes.items()) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "comparison.md", summary)
    atomic_write(out / "comparison.json", json.dumps(
        {"config": asdict(cfg), "merge_check": merge_notes,
         "runs": {k: {m: v for m, v in r.items() if m != "predicted"} for k, r in results.items()}},
        indent=2, default=str))
    log("\n" + table)
    return results
