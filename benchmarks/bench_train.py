"""Training-step benchmark: minilora vs the reference stack (transformers + peft) on one workload.

    python benchmarks/bench_train.py --model gemma-3-270m --configs mlp,selective,full,mlp+share --json out.json
    python benchmarks/bench_train.py --smoke          # 2 steps on 16 rows, one round (CI)

Both stacks train LoRA adapters on the same checkpoint folder, the same FinancialPhraseBank training
rows (seed protocol, 900 rows) in plain sequential order, batches of 8, tokenized once by minilora's
PromptFormatter so the token ids are identical, with the same hyperparameters: r 16, alpha 32, dropout
0.05 on q,k,v,o,gate,up,down, AdamW (lr schedule `minilora.trainer.lr_at`, peak 2e-4), gradient
clipping, gradient checkpointing, fp32, one micro-batch per optimizer step. Both seed torch / numpy /
random with `seed_everything(seed)` right before the adapters are created.

* minilora, once per --configs entry: `build_model` + `inject_adapters` + `model.gradient_checkpointing
  = True` with that checkpoint policy (and the shared prefix for `+share`; the NF4-quantized base
  of `train.py --qlora` for `+qlora`, with `--dequantize-once` for `+once`), then per step
  what `minilora.trainer.train` does: `accumulate_gradients` (answer-token loss, LM head only at the
  supervised positions), clip, fused AdamW step.
* reference (the seeds' way): `AutoModelForCausalLM.from_pretrained` + `peft.get_peft_model`,
  `gradient_checkpointing_enable(use_reentrant=False)`, loss `model(..., labels=...).loss` with -100 on
  prompt and padding (full-vocabulary logits), right padding, `torch.optim.AdamW`.

Each run is its own subprocess (`--worker minilora|reference`, one JSON line on stdout), alternating
the minilora configurations and the reference for --rounds rounds, so peak RSS is per stack and machine drift hits both.
Reported: seconds per optimizer step (median after --warmup steps), non-pad training tokens per
second, peak RSS (ru_maxrss), the loss of every step (final loss, max relative difference of the two
curves), and minilora's useful GFLOP/s against a plain fp32 matmul rate measured in the same worker
(see `common.step_flops` for what is counted). Timings are measurements, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import (DEFAULT_DATA, TARGETS, MatmulProbe, environment, float_in, int_at_least, log, machine_label,
                    malloc_in_use,
                    markdown_table, median, peak_rss_mb, reference_stack_missing, run_worker, set_threads, step_flops,
                    supervised_positions, write_json)

STACKS = ("minilora", "reference")
MALLOC_CHOICES = ("cli", "same", "system")
POLICIES = ("selective", "full", "mlp")  # minilora.recompute.CHECKPOINT_POLICIES (the driver does not import torch)
SMOKE_CONFIGS = "mlp,selective,full+share+qlora+once"
MODIFIERS = {"share": ("--share-prefix", "shared prefix"), "qlora": ("--qlora", "QLoRA"),
             "once": ("--dequantize-once", "dequantize once per step")}  # name -> (worker flag, label)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="packaged short name (gemma-3-270m, smollm2-135m-instruct) "
                                                           "or an HF checkpoint folder")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="FinancialPhraseBank zip")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="optimizer steps per run (wraps around the rows)")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="first steps left out of the timing median")
    p.add_argument("--rounds", type=int_at_least(1), default=3, help="minilora / reference alternations")
    p.add_argument("--rows", type=int_at_least(0), default=0, help="use only the first N training rows (0: all 900)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--max-len", type=int_at_least(1), default=256,
                   help="longest prompt + answer allowed, a guard only: rows are never truncated and batches are "
                        "padded to their longest row (5 gemma rows are 129-138 tokens)")
    p.add_argument("--lr", type=float_in(0, low_open=True), default=2e-4,
                   help="peak learning rate of the lr_at schedule")
    p.add_argument("--warmup-ratio", type=float_in(0, 1), default=0.03, help="lr warm-up fraction of --steps")
    p.add_argument("--weight-decay", type=float_in(0), default=0.001)
    p.add_argument("--max-grad-norm", type=float_in(0), default=0.3, help="gradient clipping (0: none)")
    p.add_argument("--lora-r", type=int_at_least(1), default=16)
    p.add_argument("--lora-alpha", type=float_in(0, low_open=True), default=32.0)
    p.add_argument("--lora-dropout", type=float_in(0, 1, high_open=True), default=0.05)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"], help="as train.py")
    p.add_argument("--configs", default=None,
                   help="comma-separated minilora configurations, each run against the same reference: a "
                        "checkpoint policy (mlp, selective, full), then optional modifiers: +share (shared instruction "
                        "prefix, which the reference cannot do), +qlora (NF4 base), +once (with +qlora: "
                        "--dequantize-once), e.g. mlp,selective,full,mlp+share,mlp+qlora+once; "
                        f"default mlp (--smoke: {SMOKE_CONFIGS}, every code path)")
    p.add_argument("--checkpoint-policy", default="mlp", choices=POLICIES, help=argparse.SUPPRESS)
    p.add_argument("--share-prefix", action="store_true", help=argparse.SUPPRESS)  # worker side of +share
    p.add_argument("--qlora", action="store_true", help=argparse.SUPPRESS)  # worker side of +qlora
    p.add_argument("--dequantize-once", action="store_true", help=argparse.SUPPRESS)  # worker side of +once
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="intra-op threads for both stacks (default: torch's)")
    p.add_argument("--matmul-seconds", type=float_in(0, low_open=True), default=0.4,
                   help="duration of each fp32 matmul rate probe (one before the first step, one after every step)")
    p.add_argument("--malloc", default="cli", choices=MALLOC_CHOICES,
                   help="cli: minilora on the malloc train.py restarts on (tcmalloc when installed, see "
                        "minilora/allocator.py), the reference on the system's, as each stack's users get them; "
                        "same: both on train.py's choice; system: both on the system's")
    p.add_argument("--stack", default="both", choices=["both", *STACKS], help="run only one stack")
    p.add_argument("--smoke", action="store_true", help="2 steps on 16 rows, 1 round, no warm-up (CI check)")
    p.add_argument("--json", default=None, help="write the full results here")
    p.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)  # internal: one run in this process
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.rounds, args.rows, args.matmul_seconds = 2, 0, 1, 16, 0.2
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} leaves no timed step out of --steps {args.steps}")
    if args.configs is None:
        args.configs = SMOKE_CONFIGS if args.smoke else "mlp"
    args.configs = [parse_config(c.strip(), p) for c in args.configs.split(",") if c.strip()]
    if not args.configs:
        p.error("--configs: no configuration given")
    if len(set(args.configs)) < len(args.configs):  # runs are kept by label: a repeat would merge into one row
        p.error("--configs: a configuration is repeated; use --rounds for more runs of one")
    return args


def parse_config(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """"selective+qlora+once" -> ("selective", "qlora", "once")."""
    policy, *modifiers = text.split("+")
    if policy not in POLICIES or set(modifiers) - set(MODIFIERS) or len(set(modifiers)) < len(modifiers):
        parser.error(f"--configs: {text!r} is not POLICY[+MODIFIER...] with POLICY one of {POLICIES} and "
                     f"modifiers from {tuple(MODIFIERS)}")
    if "once" in modifiers and "qlora" not in modifiers:
        parser.error(f"--configs: {text!r}: +once needs +qlora (it applies to NF4 weights)")
    return (policy, *sorted(modifiers, key=list(MODIFIERS).index))  # one order: a repeat in another is seen


def config_label(config: tuple[str, ...]) -> str:
    policy, *modifiers = config
    return " + ".join([f"minilora {policy}"] + [MODIFIERS[m][1] for m in modifiers])


def worker_argv(args: argparse.Namespace, stack: str, config: tuple[str, ...] | None = None) -> list[str]:
    """The flags that define the workload, passed on to a worker (smoke already expanded)."""
    argv = ["--worker", stack, "--model", args.model, "--data", args.data, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--rows", str(args.rows), "--batch-size", str(args.batch_size),
            "--max-len", str(args.max_len), "--lr", str(args.lr), "--warmup-ratio", str(args.warmup_ratio),
            "--weight-decay", str(args.weight_decay), "--max-grad-norm", str(args.max_grad_norm),
            "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
            "--lora-dropout", str(args.lora_dropout), "--prompt-format", args.prompt_format,
            "--seed", str(args.seed), "--matmul-seconds", str(args.matmul_seconds)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if config:
        policy, *modifiers = config
        argv += ["--checkpoint-policy", policy] + [MODIFIERS[m][0] for m in modifiers]
    return argv


def worker_env(malloc: str, stack: str) -> dict[str, str]:
    """The environment a worker starts in: LD_PRELOAD set as `--malloc` says (see its help)."""
    from minilora.allocator import preferred_malloc, with_preloaded  # torch-free

    if malloc == "system" or (malloc == "cli" and stack == "reference"):
        return {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    try:
        return with_preloaded(preferred_malloc())
    except FileNotFoundError as err:  # a mistyped MINILORA_MALLOC: one line, as train.py says it
        raise SystemExit(f"error: {err}") from None


# ------------------------------------------------------------------------------------------ workers


def prepare_batches(args: argparse.Namespace):
    """Checkpoint folder, model config and the collated batches (identical in both workers)."""
    from common import load_splits, make_formatter_for
    from minilora.checkpoint import resolve_checkpoint
    from minilora.config import ModelConfig
    from minilora.prompts import collate

    folder = resolve_checkpoint(args.model)
    splits = load_splits(args.data, args.seed)
    rows = splits.train[: args.rows] if args.rows else splits.train
    formatter = make_formatter_for(folder, args.prompt_format, splits.info.labels)
    examples = [formatter.tokenize(ex.text, ex.label) for ex in rows]
    lengths = [len(ex.prompt_ids) + len(ex.answer_ids) for ex in examples]
    if max(lengths) > args.max_len:
        raise SystemExit(f"error: {sum(n > args.max_len for n in lengths)} training rows are longer than --max-len "
                         f"{args.max_len} (longest {max(lengths)} tokens, {args.model} with "
                         f"{'chat' if formatter.chat else 'plain'} prompts); pass --max-len {max(lengths)} or more")
    pad = formatter.tokenizer.pad_id
    batches = [collate(examples[s : s + args.batch_size], pad, args.max_len)
               for s in range(0, len(examples), args.batch_size)]
    return folder, ModelConfig.from_file(folder / "config.json"), batches, "chat" if formatter.chat else "plain"


def training_loop(args, name: str, step_fn, batches, optimizer, params, flops_of) -> dict:
    """Run --steps optimizer steps; step_fn(batch) does forward + backward and returns the loss.

    A matmul probe runs before the first step and after every step, outside the timed span; step i is
    compared with the mean of the probes on either side of it."""
    import torch

    from minilora.trainer import LoopConfig, lr_at

    schedule = LoopConfig(lr=args.lr, warmup_ratio=args.warmup_ratio)
    probe = MatmulProbe()
    probes = [probe.gflops(args.matmul_seconds)]
    losses, seconds, tokens, flops = [], [], [], []
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, schedule)
        started = time.perf_counter()
        loss = step_fn(batch)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        probes.append(probe.gflops(args.matmul_seconds))
        losses.append(loss)
        tokens.append(int(batch.attention_mask.sum()))
        flops.append(flops_of(batch))
        log(f"[{name}] step {step + 1}/{args.steps} loss {loss:.4f} {seconds[-1]:.2f} s, "
            f"matmul {probes[-1]:.0f} GFLOP/s")
    step_matmul = [(before + after) / 2 for before, after in zip(probes, probes[1:])]
    timed = slice(args.warmup, None)
    time_sum = sum(seconds[timed])
    return {
        "losses": losses, "step_seconds": seconds, "tokens": tokens, "useful_flops": flops,
        "step_matmul_gflops_per_s": step_matmul,
        "step_useful_over_matmul": [f / s / 1e9 / rate for f, s, rate in zip(flops, seconds, step_matmul)],
        "median_step_s": median(seconds[timed]),
        "tokens_per_s": sum(tokens[timed]) / time_sum,
        "useful_gflops_per_s": sum(flops[timed]) / time_sum / 1e9,
    }


def init_checksum(params) -> float:
    """Sum of |A| over the adapters at creation: equal when both stacks drew the same initial weights."""
    return float(sum(p.detach().abs().sum() for p in params))


def minilora_worker(args: argparse.Namespace) -> dict:
    import torch

    from minilora.device import seed_everything
    from minilora.finetune import build_model
    from minilora.lora import LoraConfig, adapter_parameters, inject_adapters
    from minilora.trainer import _shared_prefix_length, accumulate_gradients

    threads = set_threads(args.threads)
    folder, cfg, batches, prompt_format = prepare_batches(args)
    device = torch.device("cpu")
    started = time.perf_counter()
    loaded, _ = build_model(str(folder), device, torch.float32, qlora=args.qlora)
    model = loaded.model
    seed_everything(args.seed)  # adapters are drawn from this seed, as in finetune.run
    inject_adapters(model, LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                      target_modules=list(TARGETS)))
    model.gradient_checkpointing = True
    model.checkpoint_policy = args.checkpoint_policy
    model.train()
    params = adapter_parameters(model)
    checksum = init_checksum(p for n, p in model.named_parameters() if "lora_A" in n)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    load_s = time.perf_counter() - started

    def step_fn(batch) -> float:
        loss, _, _, _ = accumulate_gradients(model, [batch], device, args.share_prefix, args.dequantize_once)
        return loss

    def flops_of(batch) -> float:
        prefix = _shared_prefix_length(batch) if args.share_prefix else 0
        return step_flops(cfg, batch.attention_mask.sum(1).tolist(), supervised_positions(batch.labels),
                          args.lora_r, TARGETS, prefix)["total"]

    result = training_loop(args, "minilora", step_fn, batches, optimizer, params, flops_of)
    return {"stack": "minilora", "threads": threads, "load_s": load_s, "folder": str(folder),
            "prompt_format": prompt_format, "init_checksum": checksum, "share_prefix": args.share_prefix,
            "checkpoint_policy": args.checkpoint_policy, "qlora": args.qlora,
            "dequantize_once": args.dequantize_once, **result,
            "peak_rss_mb": peak_rss_mb(), "malloc": malloc_in_use()}


def reference_worker(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from minilora.device import seed_everything

    threads = set_threads(args.threads)
    folder, cfg, batches, prompt_format = prepare_batches(args)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seed_everything(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    checksum = init_checksum(p for n, p in model.named_parameters() if "lora_A" in n)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    load_s = time.perf_counter() - started

    def step_fn(batch) -> float:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                    use_cache=False)
        out.loss.backward()
        return out.loss.item()

    def flops_of(batch) -> float:  # same workload, no prefix sharing
        return step_flops(cfg, batch.attention_mask.sum(1).tolist(), supervised_positions(batch.labels),
                          args.lora_r, TARGETS)["total"]

    result = training_loop(args, "reference", step_fn, batches, optimizer, params, flops_of)
    return {"stack": "reference", "threads": threads, "load_s": load_s, "folder": str(folder),
            "prompt_format": prompt_format, "init_checksum": checksum,
            "attn_implementation": getattr(model.config, "_attn_implementation", None), **result,
            "peak_rss_mb": peak_rss_mb(), "malloc": malloc_in_use()}


# ------------------------------------------------------------------------------------------- driver


def summarize(runs: list[dict], warmup: int) -> dict:
    """One stack's rounds: medians over every timed step of every round, max RSS."""
    first = runs[0]
    timed = [s for run in runs for s in run["step_seconds"][warmup:]]
    timed_tokens = sum(sum(run["tokens"][warmup:]) for run in runs)
    timed_flops = sum(sum(run["useful_flops"][warmup:]) for run in runs)
    return {
        "rounds": len(runs),
        "median_step_s": median(timed),
        "round_median_step_s": [run["median_step_s"] for run in runs],
        "tokens_per_s": timed_tokens / sum(timed),
        "useful_gflops_per_s": timed_flops / sum(timed) / 1e9,
        "matmul_gflops_per_s": median([rate for run in runs for rate in run["step_matmul_gflops_per_s"][warmup:]]),
        "useful_over_matmul": median([ratio for run in runs for ratio in run["step_useful_over_matmul"][warmup:]]),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "load_s": median([run["load_s"] for run in runs]),
        "losses": first["losses"],
        "final_loss": first["losses"][-1],
        "losses_same_every_round": all(run["losses"] == first["losses"] for run in runs),
        "init_checksum": first["init_checksum"],
        "malloc": "/".join(sorted({run["malloc"] for run in runs})),
    }


def report(args: argparse.Namespace, results: dict[str, dict], threads: int, skipped: str | None) -> str:
    """One row per run configuration; ratios are against the reference of the same run."""
    ref = results.get("reference")
    runs = {name: r for name, r in results.items() if name != "comparison"}
    comparison = {}
    if ref:
        for name, r in runs.items():
            diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])]
            same_init = abs(r["init_checksum"] - ref["init_checksum"]) <= 1e-6 * abs(ref["init_checksum"])
            comparison[name] = {"max_rel_loss_diff": max(diffs), "rel_loss_diff": diffs, "same_init": same_init,
                                "speedup": ref["median_step_s"] / r["median_step_s"],
                                "rss_ratio": r["peak_rss_mb"] / ref["peak_rss_mb"]}
    rows = []
    for name, r in runs.items():
        c = comparison.get(name, {})
        rows.append([name, r["median_step_s"], c.get("speedup"), r["tokens_per_s"], r["peak_rss_mb"],
                     c.get("rss_ratio"), r["final_loss"], c.get("max_rel_loss_diff"), r["useful_gflops_per_s"],
                     r["matmul_gflops_per_s"], r["useful_over_matmul"], r["load_s"], r["malloc"]])
    timed = args.steps - args.warmup
    lines = [f"## Training step: {args.model}, {args.steps} steps ({timed} timed after {args.warmup} warm-up), "
             f"{args.rounds} round(s), batch {args.batch_size}, {machine_label(threads)}", "",
             markdown_table(["run", "s / step (median)", "speed-up vs reference", "tokens / s", "peak RSS (MiB)",
                             "RSS / reference", "final loss", "max rel. loss diff vs reference", "useful GFLOP/s",
                             "matmul GFLOP/s", "useful / matmul", "model load (s)", "malloc"], rows), ""]
    if skipped:
        lines.append(f"reference: skipped ({skipped})")
    for name, c in comparison.items():
        if name == "reference":
            continue
        r = runs[name]
        lines.append(f"{name}: loss curve max relative difference {c['max_rel_loss_diff']:.3e} (step 1: "
                     f"{r['losses'][0]:.5f} vs {ref['losses'][0]:.5f}); initial adapter weights "
                     f"{'identical' if c['same_init'] else 'DIFFER'} (sum |A| {r['init_checksum']:.6f} vs "
                     f"{ref['init_checksum']:.6f})")
    if comparison:
        results["comparison"] = {name: c for name, c in comparison.items() if name != "reference"}
    lines.append("useful GFLOP/s counts the task's work only (no recomputation, padding or unneeded logits; "
                 "see common.step_flops); matmul GFLOP/s is a fp32 2048^3 torch.mm probed in the same worker between "
                 "steps (median); useful / matmul is the median over timed steps of each step's useful rate over the "
                 "probes on either side of it")
    for name, summary in runs.items():
        if not summary["losses_same_every_round"]:
            lines.append(f"note: {name}'s losses differ between rounds (non-deterministic run)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run = minilora_worker if args.worker == "minilora" else reference_worker
        print(json.dumps(run(args)), flush=True)
        return 0

    stacks = list(STACKS) if args.stack == "both" else [args.stack]
    skipped = reference_stack_missing() if "reference" in stacks else None
    if skipped:
        log(f"reference: {skipped}")
        stacks.remove("reference")
        if not stacks:
            return 0
    jobs = [(config_label(c), "minilora", c) for c in args.configs if "minilora" in stacks]
    jobs += [("reference", "reference", None)] if "reference" in stacks else []
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in jobs}
    failed = None  # the reference's failure: minilora's figures are still reported, and the exit code says it
    for round_index in range(args.rounds):
        for label, stack, config in jobs:
            if stack == "reference" and failed:
                continue
            log(f"round {round_index + 1}/{args.rounds}: {label}")
            try:
                runs[label].append(run_worker(Path(__file__), worker_argv(args, stack, config),
                                              worker_env(args.malloc, stack)))
            except RuntimeError as err:  # the worker printed its own error / traceback on stderr
                log(f"error: {err}")
                if stack != "reference":
                    return 2
                failed = skipped = f"failed: {err}"
    runs = {label: label_runs for label, label_runs in runs.items() if label_runs}
    if not runs:
        return 2

    threads = next(iter(runs.values()))[0]["threads"]
    results = {label: summarize(label_runs, args.warmup) for label, label_runs in runs.items()}
    text = report(args, results, threads, skipped)
    print(text, flush=True)
    write_json(args.json, {"args": vars(args), "environment": environment(), "summary": results,
                           "report": text, "runs": runs, "reference_skipped": skipped})
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
