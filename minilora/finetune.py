"""A whole fine-tuning run, as train.py does it: config -> data -> model -> adapters -> loop -> report.

Order matters and is spelled out in `run`: seed, load (quantize layer by layer for QLoRA), inject
adapters (A is drawn here, after seeding), freeze, train, save, evaluate.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import data as data_mod
from .adapter_io import save_adapter
from .checkpoint import load_model
from .device import pick_device, pick_dtype, seed_everything
from .evaluate import evaluate
from .lora import LoraConfig, check_lora_config, find_targets, inject_adapters, merged_for_inference, trainable_summary
from .loss import completion_loss
from .model import CausalLM
from .prompts import PromptFormatter, collate, load_template
from .quant import quantize_module_nf4
from .recompute import CHECKPOINT_POLICIES
from .report import atomic_write
from .scoring import label_logprobs, predict_labels
from .run_folder import (check_output_dir, check_same_data, check_same_tokens, prepare_output_dir,
                         prompt_fingerprint, tokens_fingerprint)
from .run_state import RunError
from .tokenizer import Tokenizer
from .trainer import LoopConfig, train

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def opt(default, help: str, **kwargs):
    """A config field whose help text becomes the CLI flag's help."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class RunConfig:
    """Every setting of a training run; train.py's flags are these fields (`--lora-r` is lora_r)."""

    model: str = opt("gemma-3-270m", "Hub id, local HF folder, or packaged short name (gemma-3-270m, smollm2-135m-instruct)")
    data: str | None = opt(None, "FinancialPhraseBank zip / folder / Sentences_*.txt, or CSV / JSONL with text,label; "
                                 "default: fetch the official zip from the Hub")
    labels: str = opt(",".join(data_mod.DEFAULT_LABELS), "the label set of the rows, comma-separated; the default "
                      "prompt names positive / neutral / negative, so another set wants --prompt-template")
    agreement: str = opt("50", "annotator agreement level of FinancialPhraseBank", choices=["50", "66", "75", "all"])
    split_protocol: str = opt("seed", "seed: N per class train / test; standard: stratified 75/25 (1,212 test rows)",
                              choices=["seed", "standard"])
    train_per_class: int = opt(300, "seed protocol: training rows per class")
    test_per_class: int = opt(300, "seed protocol: test rows per class")
    output_dir: str = opt("runs/finetune", "where the adapter, checkpoints, metrics and reports go")
    overwrite: bool = opt(False, "replace an output folder that holds another run")
    resume: bool = opt(False, "continue the run in --output-dir from its last checkpoint")
    epochs: float = opt(1.0, "passes over the training split")
    max_steps: int = opt(-1, "stop after this many optimizer steps (overrides --epochs when > 0)")
    lr: float = opt(2e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = opt(0.03, "fraction of steps with linear warmup before the cosine decay")
    weight_decay: float = opt(0.001, "AdamW weight decay")
    max_grad_norm: float = opt(0.3, "gradient clipping norm (0 disables)")
    batch_size: int = opt(8, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_seq_len: int = opt(512, "longest prompt + answer of a training row, in tokens: a guard, not a padding "
                                "length (batches pad to their own longest row)")
    adapter: str = opt("lora", "adapter variant: a key of minilora.lora.ADAPTER_VARIANTS (lora, dora, ...)")
    lora_r: int = opt(16, "adapter rank")
    lora_alpha: float = opt(32.0, "adapter scale numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the adapter input")
    use_rslora: bool = opt(False, "rank-stabilised scale alpha / sqrt(r)")
    target_modules: str = opt(DEFAULT_TARGETS, "comma-separated module names (matched as name suffixes), "
                                               "all-linear, or a regex matched against the full module name")
    qlora: bool = opt(False, "quantize the frozen base to NF4 (bitsandbytes) while loading")
    dequantize_once: bool = opt(False, "QLoRA: dequantize each NF4 weight once per optimizer step and keep it for "
                                       "the step (fewer dequantizations; holds the block weights in the compute dtype)")
    gradient_checkpointing: bool = opt(True, "recompute activations in backward to save memory (what is "
                                             "recomputed: --checkpoint-policy)")
    checkpoint_policy: str = opt("mlp", "what checkpointing keeps: mlp = all but the MLP's gated product and the "
                                        "projections' normed inputs, which backward recomputes; no block replayed "
                                        "(fastest); selective = each whole block, keeping the projections' outputs "
                                        "(about as much memory); full = only each block's input (least memory)",
                                 choices=list(CHECKPOINT_POLICIES))
    share_prefix: bool = opt(False, "compute the shared instruction prefix once per micro-batch (exact with "
                                    "dropout 0; with dropout the rows of a micro-batch share the prefix's masks)")
    class_weights: str = opt("none", "per-example loss weights by class", choices=["none", "balanced"])
    balanced_sampling: bool = opt(False, "oversample minority classes in the training order")
    prompt_template: str | None = opt(None, "file with a prompt template containing one {text} slot")
    prompt_format: str = opt("auto", "chat: through the checkpoint's chat template; plain: raw instruction; "
                                     "auto: chat when the checkpoint has a template", choices=["auto", "chat", "plain"])
    skip_bad_rows: bool = opt(False, "drop rows with an empty text or an unknown label (counted in data_info.json) "
                                     "instead of stopping")
    seed: int = opt(42, "seed of splits, adapter init, data order and dropout")
    eval_every: int = opt(25, "validate (loss + accuracy) every N steps; 0: only at the end")
    val_limit: int = opt(150, "validation rows used (0: all)")
    save_every: int = opt(25, "checkpoint every N steps; 0: only at the end")
    eval_limit: int = opt(0, "evaluate a seeded random subset of N test rows at the end (0: all)")
    eval_method: str = opt("score", "final test evaluation method", choices=["score", "generate"])
    eval_baseline: bool = opt(False, "also evaluate the base model (adapters disabled) on the test split")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = opt("auto", "compute dtype of the frozen base: auto (bf16 on CUDA, fp32 on CPUs without fast "
                             "bf16), fp32, bf16")

    def lora_config(self) -> LoraConfig:
        targets: str | list[str] = self.target_modules  # "all-linear", or a regex matched in full, as in peft
        if targets != "all-linear" and not re.search(r"[*+?\[\](){}|^$\\]", targets):
            targets = [t.strip() for t in targets.split(",") if t.strip()]  # plain names: suffixes
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=targets,
                          use_rslora=self.use_rslora, variant=self.adapter)

    def loop_config(self) -> LoopConfig:
        shared = {f.name for f in fields(LoopConfig)} & {f.name for f in fields(self)}
        return LoopConfig(**{name: getattr(self, name) for name in shared})


def check_settings(cfg: RunConfig) -> None:
    """Numbers out of range, refused before anything is loaded or written."""
    if cfg.lora_r <= 0:
        raise RunError(f"--lora-r must be > 0, found {cfg.lora_r}")
    for flag, value in (("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                        ("--max-seq-len", cfg.max_seq_len)):
        if value < 1:
            raise RunError(f"{flag} must be >= 1, found {value}")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise RunError(f"--warmup-ratio must be in [0, 1], found {cfg.warmup_ratio}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise RunError(f"--epochs must be > 0 (or --max-steps > 0), found {cfg.epochs}")
    for flag, value in (("--eval-every", cfg.eval_every), ("--save-every", cfg.save_every),
                        ("--val-limit", cfg.val_limit), ("--eval-limit", cfg.eval_limit)):
        if value < 0:
            raise RunError(f"{flag} must be >= 0, found {value}")
    if cfg.dequantize_once and not cfg.qlora:
        raise RunError("--dequantize-once applies to NF4 weights only: add --qlora or drop it")
    if cfg.class_weights == "balanced" and cfg.balanced_sampling:
        raise RunError("--class-weights balanced and --balanced-sampling each correct the class imbalance; "
                       "together they over-correct it (the rarest class would weigh the most): keep one")
    try:
        check_lora_config(cfg.lora_config())
    except ValueError as error:
        raise RunError(f"adapter settings: {error}") from None


# --------------------------------------------------------------------------------- model building


def build_model(model: str, device: torch.device, dtype: torch.dtype, qlora: bool = False):
    """Load a checkpoint; with qlora, each decoder layer is quantized to NF4 as soon as it is loaded."""
    hook = (lambda layer: quantize_module_nf4(layer, compute_dtype=dtype, device=device)) if qlora else None
    loaded = load_model(model, dtype=dtype, device=device, on_layer_loaded=hook)
    return loaded, Tokenizer(loaded.folder)


def note_label_set(labels: tuple[str, ...], prompt_template: str | None, log) -> None:
    if prompt_template is None and labels != data_mod.DEFAULT_LABELS:
        log(f"note: labels {list(labels)} with the default prompt, which asks for positive / neutral / negative; "
            "--prompt-template gives a prompt that names this label set")


def make_formatter(tokenizer: Tokenizer, prompt_format: str, template_file: str | None,
                   labels: tuple[str, ...]) -> PromptFormatter:
    chat = prompt_format == "chat" or (prompt_format == "auto" and tokenizer.chat_template is not None)
    return PromptFormatter(tokenizer, load_template(template_file), chat=chat, labels=labels)


# ----------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig, log=print) -> dict:
    """Train an adapter as configured and evaluate it on the test split; returns the test metrics."""
    with ExitStack() as held:  # the output folder's lock, from prepare_output_dir to the end of the run
        return _run(cfg, log, held)


def _run(cfg: RunConfig, log, held: ExitStack) -> dict:
    check_settings(cfg)
    check_output_dir(cfg)
    load_template(cfg.prompt_template)  # a bad template file is found before the model loads
    device = pick_device(cfg.device)
    dtype = pick_dtype(device, cfg.dtype)
    log("config: " + json.dumps(asdict(cfg)))
    seed_everything(cfg.seed)

    splits = data_mod.load_dataset(cfg.data, agreement=cfg.agreement, protocol=cfg.split_protocol,
                                   train_per_class=cfg.train_per_class, test_per_class=cfg.test_per_class, seed=cfg.seed,
                                   labels=data_mod.parse_label_set(cfg.labels), skip_bad_rows=cfg.skip_bad_rows)
    note_label_set(splits.info.labels, cfg.prompt_template, log)
    if cfg.resume:
        check_same_data(Path(cfg.output_dir), splits.info)
    log(f"data: {len(splits.train)} train / {len(splits.validation)} validation / {len(splits.test)} test rows")
    for name, rows in (("training", splits.train), ("test", splits.test)):
        if not rows:  # the run trains on one and ends by evaluating the other
            raise RunError(f"{cfg.data}: the {name} split is empty")

    loaded, tokenizer = build_model(cfg.model, device, dtype, cfg.qlora)
    model = loaded.model
    formatter = make_formatter(tokenizer, cfg.prompt_format, cfg.prompt_template, splits.info.labels)
    log(f"model: {cfg.model} ({loaded.config.model_type}, {dtype}, {device}{', NF4' if cfg.qlora else ''}); "
        f"prompt format: {'chat template' if formatter.chat else 'plain'}")
    if cfg.resume:
        check_same_tokens(Path(cfg.output_dir), formatter)

    train_examples = [formatter.tokenize(ex.text, ex.label) for ex in splits.train]
    lengths = [len(e.prompt_ids) + len(e.answer_ids) for e in train_examples]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > cfg.max_seq_len:
        over = sum(length > cfg.max_seq_len for length in lengths)
        raise RunError(f"{over} training example(s) are longer than --max-seq-len {cfg.max_seq_len}; the longest has "
                       f"{lengths[longest]} tokens: {splits.train[longest].text[:80]!r}")

    find_targets(model, cfg.lora_config())  # the targets exist
    weights = data_mod.class_weights(splits.train, splits.info.labels, cfg.class_weights)  # may refuse the split
    out = prepare_output_dir(cfg, held)  # nothing was written before this point
    # cwd: where relative paths start from, so that a --resume from another folder compares the same files
    saved = {**asdict(cfg), "cwd": os.getcwd(), "prompt_sha256": prompt_fingerprint(cfg.prompt_template),
             "prompt_tokens_sha256": tokens_fingerprint(formatter)}
    atomic_write(out / "run_config.json", json.dumps(saved, indent=2, default=str))
    atomic_write(out / "data_info.json", json.dumps(asdict(splits.info), indent=2, default=str))

    seed_everything(cfg.seed)  # adapters are initialised from this seed whatever loading consumed
    inject_adapters(model, cfg.lora_config())
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.checkpoint_policy = cfg.checkpoint_policy
    log(trainable_summary(model))

    sample_order = (lambda epoch: data_mod.balanced_order(splits.train, cfg.seed, epoch)) if cfg.balanced_sampling else None
    validation = subset_rows(splits.validation, cfg.val_limit, cfg.seed)
    validate = (lambda m: validation_scores(m, formatter, validation, cfg.batch_size)) if validation else None

    result = train(model, train_examples, cfg.loop_config(), out, tokenizer.pad_id, class_weights=weights,
                   validate=validate, resume=cfg.resume, sample_order=sample_order, base_model=cfg.model, log=log)
    save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model)
    log(f"trained {result.steps} steps in {result.seconds:.0f} s; final loss {result.final_loss:.4f}; "
        f"adapter saved to {out / 'adapter'}")

    meta = {"model": cfg.model, "adapter": str(out / "adapter"), "seed": cfg.seed,
            "split_protocol": splits.info.protocol}
    test_rows = subset_rows(splits.test, cfg.eval_limit, cfg.seed)
    metrics = evaluate(model, formatter, test_rows, out / "eval", "fine-tuned", method=cfg.eval_method,
                       batch_size=max(cfg.batch_size, 16), meta=meta)
    log(f"test accuracy ({cfg.eval_method}, {len(test_rows)} rows): {metrics['accuracy']:.4f}, "
        f"macro F1 {metrics['macro_f1']:.4f}")
    if cfg.eval_baseline:
        from .lora import disable_adapters

        with disable_adapters(model):
            base = evaluate(model, formatter, test_rows, out / "eval_baseline", "baseline",
                            method=cfg.eval_method, batch_size=max(cfg.batch_size, 16), meta={**meta, "adapter": None})
        log(f"baseline test accuracy: {base['accuracy']:.4f}")
    return metrics


def subset_rows(examples: list, limit: int, seed: int) -> list:
    """A seeded random subset of `limit` rows in their original order (files are often sorted by class,
    so the first N rows would not be representative)."""
    if limit <= 0 or len(examples) <= limit:
        return list(examples)
    import numpy as np

    index = np.random.default_rng(seed).permutation(len(examples))[:limit]
    return [examples[i] for i in sorted(index)]


@torch.no_grad()
def validation_scores(model: CausalLM, formatter: PromptFormatter, examples: list, batch_size: int,
                      merged: bool = True) -> dict:
    """Answer-token loss and label-scoring accuracy on validation rows. merged: as in
    `evaluate.predict` (`lora.merged_for_inference` puts the training weights back bit for bit).
    Rows are never truncated, and --max-seq-len (a bound on training's memory) does not apply: without
    gradients a long row costs little, and a validation row over it must not end a run midway, after
    steps not yet checkpointed (benchmarks/NOTES.md, round 16)."""
    model.eval()
    with merged_for_inference(model) if merged else nullcontext():
        return _loss_and_accuracy(model, formatter, examples, batch_size)


def _loss_and_accuracy(model: CausalLM, formatter: PromptFormatter, examples: list, batch_size: int) -> dict:
    nll, weight = 0.0, 0.0
    tokenized = [formatter.tokenize(ex.text, ex.label) for ex in examples]
    max_len = max(len(ex.prompt_ids) + len(ex.answer_ids) for ex in tokenized)
    for start in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[start : start + batch_size], formatter.tokenizer.pad_id, max_len)
        terms = completion_loss(model, batch.to(next(model.parameters()).device))
        nll, weight = nll + terms.nll_sum.item(), weight + terms.weight_sum.item()
    logprobs = label_logprobs(model, formatter, [ex.text for ex in examples], batch_size=max(batch_size, 16))
    predicted = predict_labels(logprobs, formatter.labels)
    accuracy = sum(p == ex.label for p, ex in zip(predicted, examples)) / len(examples)
    return {"loss": nll / weight, "accuracy": accuracy}
