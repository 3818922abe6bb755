"""The training loop: one flat function, `train`, with the few helpers it needs beside it.

Schedule (linear warmup + cosine decay) is a pure function of the step, batches are a pure function
of (seed, epoch), and the RNG state is saved with every checkpoint, so `--resume` continues exactly
where a run stopped: the same adapter at the end as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import quant
from .adapter_io import save_adapter
from .lora import adapter_parameters, adapter_state_dict
from .loss import completion_loss
from .model import CausalLM
from .prompts import Batch, TokenizedExample, collate, common_prefix_length
from .run_state import RunError, find_checkpoint, load_state, save_checkpoint, set_rng_state

@dataclass
class LoopConfig:
    """Optimisation settings of the loop (the CLI's full config lives in `finetune.RunConfig`)."""

    epochs: float = 1.0  # passes over the training split (fractions allowed)
    max_steps: int = -1  # > 0 stops after this many optimizer steps (overrides epochs)
    lr: float = 2e-4  # peak learning rate
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW weight decay on the adapters
    max_grad_norm: float = 1.0  # gradient clipping (<= 0 disables)
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 512  # longest prompt + answer allowed (a guard: batches pad to their own longest row)
    group_by_length: bool = True  # batches of similar length: less padding
    share_prefix: bool = False  # compute the instruction prefix once per micro-batch
    dequantize_once: bool = False  # QLoRA: each NF4 weight dequantized once per optimizer step
    seed: int = 42  # data order and dropout
    eval_every: int = 0  # validate every N steps (0: only at the end)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    log_every: int = 1  # progress line every N steps


# ------------------------------------------------------------------------------------- schedule


def lr_at(step: int, total_steps: int, cfg: LoopConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  sample_order: Callable[[int], list[int]] | None = None) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch, a pure function of (seed, epoch).

    Length grouping: shuffle, sort inside windows of 64 batches by length, then shuffle the batches,
    so batches hold similar lengths but the order stays random."""
    rng = np.random.default_rng([seed, epoch])
    order = list(sample_order(epoch)) if sample_order is not None else rng.permutation(len(lengths)).tolist()
    if group_by_length:
        window = batch_size * 64
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda i: -lengths[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def plan_steps(lengths: list[int], cfg: LoopConfig, sample_order=None) -> list[list[list[int]]]:
    """Every optimizer step of the run as its list of micro-batches (row indices)."""
    steps: list[list[list[int]]] = []
    epoch = 0
    n_epochs = math.ceil(cfg.epochs)
    while cfg.max_steps > 0 and len(steps) < cfg.max_steps or epoch < n_epochs and cfg.max_steps <= 0:
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, sample_order)
        if cfg.max_steps <= 0 and epoch == n_epochs - 1 and cfg.epochs % 1:  # fractional last epoch
            # HF Trainer's count of optimizer steps, ceil(fraction * steps per epoch); round() first drops
            # float noise (100 * 0.3)
            steps_per_epoch = math.ceil(len(batches) / cfg.grad_accum)
            last_steps = max(1, math.ceil(round(steps_per_epoch * (cfg.epochs % 1), 6)))
            batches = batches[: last_steps * cfg.grad_accum]
        steps.extend(batches[s : s + cfg.grad_accum] for s in range(0, len(batches), cfg.grad_accum))
        epoch += 1
    return steps[: cfg.max_steps] if cfg.max_steps > 0 else steps


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    best_step: int | None
    best_metric: float | None
    seconds: float


def train(
    model: CausalLM,
    train_examples: list[TokenizedExample],
    cfg: LoopConfig,
    out_dir: Path,
    pad_id: int,
    class_weights: dict[str, float] | None = None,
    validate: Callable[[CausalLM], dict] | None = None,
    resume: bool = False,
    sample_order: Callable[[int], list[int]] | None = None,
    base_model: str | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the adapters of `model` on tokenized examples; checkpoints go to out_dir/checkpoint,
    the best adapter (by validate()["accuracy"], then lower loss) to out_dir/best."""
    device = next(p for p in adapter_parameters(model)).device
    params = adapter_parameters(model)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    lengths = [len(ex.prompt_ids) + len(ex.answer_ids) for ex in train_examples]
    steps = plan_steps(lengths, cfg, sample_order)
    total_steps = len(steps)
    metrics = MetricsLog(out_dir / "metrics.jsonl")

    start_step, best, loss_value = 0, {"step": None, "accuracy": None, "loss": None}, float("nan")
    elapsed_before = 0.0  # training seconds of the runs this one resumes
    checkpoint_dir = out_dir / "checkpoint"
    found = find_checkpoint(checkpoint_dir) if resume else None
    if resume and found is None:  # stopped before its first checkpoint: start over, with a fresh log
        log(f"no checkpoint in {checkpoint_dir} yet: training starts at step 0")
        metrics.truncate_after(0)
    if found is not None:
        state = load_state(found)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["adapter"].items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        if state.get("total_steps", total_steps) != total_steps:  # older checkpoints do not record it
            raise RunError(f"--resume: the run in {out_dir} planned {state['total_steps']} steps and would now plan "
                           f"{total_steps} (its learning-rate schedule would change midway); start another run")
        start_step, best, loss_value = state["step"], state["best"], state.get("loss", float("nan"))
        _restore_best(best, model, out_dir, base_model)
        elapsed_before = state.get("elapsed_s", 0.0)
        record, pending_validation = _checkpoint_record(state)
        metrics.truncate_after(start_step - 1 if record is not None else start_step)
        log(f"resumed from {found} at step {start_step}/{total_steps}")
        if record is not None:  # the step's line, which a kill right after the checkpoint would lose
            if pending_validation and validate is not None:
                best = _validate_into(record, model, validate, best, out_dir, base_model, log)
            metrics.write(record)

    model.train()
    started, tokens_seen = time.time(), 0
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [
            collate([train_examples[i] for i in rows], pad_id, cfg.max_seq_len, class_weights) for rows in steps[step]
        ]
        step_loss, step_tokens, correct, rows = accumulate_gradients(
            model, micro_batches, device, cfg.share_prefix, cfg.dequantize_once
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_seen += step_tokens
        loss_value = step_loss
        elapsed = time.time() - started
        done = step + 1
        record = {
            "step": done, "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
            "train_first_token_accuracy": correct / rows, "tokens": step_tokens,
            "tokens_per_s": round(tokens_seen / elapsed, 2), "elapsed_s": round(elapsed_before + elapsed, 2),
        }
        if done % cfg.log_every == 0 or done == total_steps:
            eta = elapsed / (done - start_step) * (total_steps - done)
            _progress(log, f"step {done}/{total_steps} loss {step_loss:.4f} lr {lr:.2e} "
                           f"tok/s {record['tokens_per_s']:.0f} ETA {_clock(eta)}")
        validating = validate is not None and (cfg.eval_every > 0 and done % cfg.eval_every == 0 or done == total_steps)
        if cfg.save_every > 0 and done % cfg.save_every == 0 or done == total_steps:
            # before the validation and the metrics line, so that a failing validation costs no training;
            # the step's record waits in the checkpoint, and a resume runs that validation and writes it
            extra = {"best": best, "record": record, "pending_validation": validating, "loss": step_loss,
                     "total_steps": total_steps, "elapsed_s": elapsed_before + elapsed}
            save_checkpoint(checkpoint_dir, model, optimizer, done, extra, base_model)
        if validating:
            best = _validate_into(record, model, validate, best, out_dir, base_model, log)
        metrics.write(record)
    metrics.close()
    return TrainResult(total_steps, loss_value, best["step"], best["accuracy"], elapsed_before + time.time() - started)


def _checkpoint_record(state: dict) -> tuple[dict | None, bool]:
    """The metrics record of a checkpoint's step and whether its validation is still to run. Older
    checkpoints kept a record only when the validation was pending ("pending_record")."""
    if "record" in state:
        return state["record"], state["pending_validation"]
    pending = state.get("pending_record")
    return pending, pending is not None


def _validate_into(record: dict, model: CausalLM, validate: Callable[[CausalLM], dict], best: dict, out_dir: Path,
                   base_model: str | None, log: Callable[[str], None]) -> dict:
    """Validate after step record["step"]: add the scores to the record, save out_dir/best if they beat
    `best`; returns the best so far."""
    scores = validate(model)
    model.train()
    record.update({f"val_{k}": v for k, v in scores.items()})
    log(f"validation at step {record['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if not _is_better(scores, best):
        return best
    save_adapter(model, out_dir / "best", base_model_name_or_path=base_model)
    # the tensors ride along in the checkpoints: a resume puts back the best/ of its own trajectory
    adapter = {name: tensor.clone() for name, tensor in adapter_state_dict(model).items()}
    return {"step": record["step"], "accuracy": scores.get("accuracy"), "loss": scores.get("loss"), "adapter": adapter}


def _restore_best(best: dict, model: CausalLM, out_dir: Path, base_model: str | None) -> None:
    """best/ as it was when the checkpoint was written. Steps after it may have saved another best/, and a
    resume that does not repeat them bit for bit (another --device) would otherwise end with that one.
    Checkpoints of older versions hold no best tensors: their best/ stays as it is."""
    if best["step"] is None:
        shutil.rmtree(out_dir / "best", ignore_errors=True)
    elif "adapter" in best:
        save_adapter(model, out_dir / "best", base_model_name_or_path=base_model, state=best["adapter"])


def accumulate_gradients(model: CausalLM, micro_batches: list[Batch], device: torch.device,
                         share_prefix: bool = False, dequantize_once: bool = False) -> tuple[float, int, int, int]:
    """Backward over the micro-batches of one optimizer step; .grad then holds the gradient of the
    token-weighted mean loss of the whole step (each micro-batch divides by the step's total weight,
    not by its own). Returns (loss, tokens, rows whose first answer token was right, rows).
    dequantize_once: NF4 base weights are dequantized once for the whole step (`quant.dequantize_once`)."""
    with quant.dequantize_once(model) if dequantize_once else contextlib.nullcontext():
        return _accumulate(model, micro_batches, device, share_prefix)


def _accumulate(model: CausalLM, micro_batches: list[Batch], device: torch.device,
                share_prefix: bool) -> tuple[float, int, int, int]:
    # position 0 predicts nothing (completion_loss supervises labels[:, 1:]): it must not count here either
    step_weight = sum(float((b.weights[:, None] * (b.labels[:, 1:] != -100)).sum()) for b in micro_batches)
    step_loss, step_tokens, correct, rows = 0.0, 0, 0, 0
    for batch in micro_batches:
        batch = batch.to(device)
        prefix = _shared_prefix_length(batch) if share_prefix else 0
        terms = completion_loss(model, batch, share_prefix=prefix)
        (terms.nll_sum / step_weight).backward()
        step_loss += terms.nll_sum.item() / step_weight
        step_tokens += int(batch.attention_mask.sum())
        correct += int(terms.correct_first.sum())
        rows += len(batch.labels)
    return step_loss, step_tokens, correct, rows


def _shared_prefix_length(batch: Batch) -> int:
    """Tokens shared by every row before any row's answer (keep >= 1 own prompt token per row)."""
    rows = batch.input_ids.tolist()
    first_answer = (batch.labels != -100).float().argmax(dim=1).min().item()
    return min(common_prefix_length(rows), int(first_answer) - 1)


def _is_better(scores: dict, best: dict) -> bool:
    if best["step"] is None:
        return True
    acc, best_acc = scores.get("accuracy"), best.get("accuracy")
    if acc is not None and best_acc is not None and acc != best_acc:
        return acc > best_acc
    return scores.get("loss", math.inf) < (best.get("loss") or math.inf)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _progress(log: Callable[[str], None], line: str) -> None:
    if log is print and sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    else:
        log(line)


def _step_of(line: str) -> float:
    """The step a metrics.jsonl line records; a line an interrupted append cut short counts as after all."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """metrics.jsonl (one JSON object per step), plus TensorBoard when it is installed."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL only
            self.tensorboard = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the checkpoint does not contain."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
