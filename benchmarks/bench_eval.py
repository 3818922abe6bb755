"""Evaluation-throughput benchmark: minilora's two methods vs the seeds' way of classifying.

    python benchmarks/bench_eval.py --model gemma-3-270m [--adapter DIR] --limit 300 --json out.json
    python benchmarks/bench_eval.py --smoke           # 8 rows (CI)

Examples per second on the FinancialPhraseBank test rows (seed protocol, 900 rows) for

  (a) minilora `score`:    `minilora.evaluate.predict(..., method="score")`: label log-probabilities,
                           batched, the shared instruction prefix computed once;
  (a') minilora `score-int8`: the same with `int8=True`: the decoder's projections in int8 (W8A8,
                           per-token activations, SmoothQuant; minilora/int8.py), calibrated on the
                           first 32 rows, which run in fp32;
  (b) minilora `generate`: `predict(..., method="generate")`: batched greedy decoding with the KV cache;
  (c) the seeds' way:      transformers `AutoModelForCausalLM.from_pretrained(folder, dtype=float32)`
                           (+ `peft.PeftModel.from_pretrained` with --adapter), `model.generate(
                           max_new_tokens=4, do_sample=False)` one example at a time.

All three use the same prompt ids (minilora's PromptFormatter) and the same label parsing
(`minilora.generate.parse_label`, first word). Reported per method: rows, examples/s, accuracy,
invalid answers, and the examples/s ratios against (c). `--limit N` runs (c) on the first N rows only:
it is then reported as a subset, next to minilora's accuracy on those same rows; nothing is
extrapolated. Each method gets a 2-row warm-up call before it is timed; timings include tokenization
and exclude model loading. Timings are measurements, never assertions.

All methods run in this one process, so on one malloc, named in the report. Both minilora and the
seeds' loop run faster on tcmalloc than on glibc's malloc (benchmarks/NOTES.md, round 9); preload it
(LD_PRELOAD) to give every method the malloc eval.py restarts on.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from functools import partial

from common import (DEFAULT_DATA, OUTPUT_ONLY_IN_LAST_LAYER, MatmulProbe, environment, float_in, int_at_least,
                    linear_shapes, load_splits,
                    log, machine_label, make_formatter_for, malloc_in_use, markdown_table, peak_rss_mb,
                    reference_stack_missing, set_threads, write_json)

METHODS = ("score", "score-int8", "generate", "reference")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="packaged short name or an HF checkpoint folder")
    p.add_argument("--adapter", default=None, help="adapter folder (PEFT layout, e.g. runs/finetune/adapter)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="FinancialPhraseBank zip")
    p.add_argument("--rows", type=int_at_least(0), default=0,
                   help="use the first N test rows for every method (0: all 900)")
    p.add_argument("--limit", type=int_at_least(0), default=0,
                   help="run the seeds' generate on the first N of those rows only")
    p.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="minilora rows per forward (eval.py's default)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=4)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"], help="as train.py / eval.py")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seed", type=int, default=42, help="seed of the data split")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--matmul-seconds", type=float_in(0, low_open=True), default=2.0,
                   help="duration of each fp32 matmul rate probe (before and after each timed minilora method)")
    p.add_argument("--smoke", action="store_true", help="8 rows (CI check)")
    p.add_argument("--json", default=None, help="write the full results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.matmul_seconds = 8, 0.2
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; expected {METHODS}")
    return args


def scored(name: str, predicted: list[str], gold: list[str], seconds: float) -> dict:
    right = sum(p == g for p, g in zip(predicted, gold))
    return {"method": name, "rows": len(gold), "seconds": seconds, "examples_per_s": len(gold) / seconds,
            "accuracy": right / len(gold), "invalid": sum(p == "invalid" for p in predicted), "predicted": predicted}


def score_flops(cfg, formatter, texts: list[str]) -> dict:
    """Matmul FLOPs `score` cannot avoid, per row: every token after the shared prefix through every
    projection (2 * P_linear per token and layer), except that the last layer's q, o and MLP run only
    where an output is read (positions.Selection), the LM head at the positions predicting a label token,
    and the multi-token labels' continuations. Attention and elementwise work are left out, so this
    over-states the reachable speed. The prefix is counted once for the run."""
    from minilora.scoring import shared_prompt_prefix

    prompts = [formatter.prompt_ids(t) for t in texts]
    prefix = shared_prompt_prefix(prompts)
    shapes = linear_shapes(cfg)
    last_layer_outputs = 2 * sum(a * b for name, (a, b) in shapes.items() if name in OUTPUT_ONLY_IN_LAST_LAYER)
    per_token = 2 * sum(a * b for a, b in shapes.values()) * cfg.num_layers - last_layer_outputs
    head = 2 * cfg.hidden_size * cfg.vocab_size
    labels = [formatter.label_ids[label] for label in formatter.labels]
    continuation = sum(len(t) - 1 for t in labels)  # tokens fed after the prompt, per row
    row_tokens = sum(len(p) - prefix for p in prompts) / len(prompts)
    # outputs are read at each row's last prompt token and at every continuation token
    per_row = (row_tokens + continuation) * per_token + (1 + continuation) * (last_layer_outputs + head)
    return {"prefix_tokens": prefix, "mean_row_tokens": row_tokens, "label_tokens": [len(t) for t in labels],
            "flops_per_row": per_row, "prefix_flops": prefix * per_token}


def run_minilora(args, folder, formatter, texts, gold, methods) -> dict[str, dict]:
    import torch

    from minilora.adapter_io import load_adapter
    from minilora.evaluate import predict
    from minilora.finetune import build_model

    started = time.perf_counter()
    loaded, _ = build_model(str(folder), torch.device("cpu"), torch.float32)
    model = loaded.model
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    log(f"minilora model loaded in {time.perf_counter() - started:.1f} s")
    results, probe = {}, MatmulProbe()
    for method in methods:
        run = partial(predict, model, formatter, method=method.removesuffix("-int8"), batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, int8=method.endswith("-int8"))
        run(texts[:2])  # warm-up
        before = probe.gflops(args.matmul_seconds)  # the machine's matmul rate on either side of the timed run
        out = run(texts)
        results[method] = scored(f"minilora {method}", out.predicted, gold, out.seconds)
        results[method]["matmul_gflops_per_s"] = (before + probe.gflops(args.matmul_seconds)) / 2
        log(f"minilora {method}: {results[method]['examples_per_s']:.2f} examples/s, "
            f"accuracy {results[method]['accuracy']:.4f}")
    del model, loaded
    gc.collect()
    return results


def run_reference(args, folder, formatter, texts, gold) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from minilora.generate import parse_label

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    log(f"reference model loaded in {time.perf_counter() - started:.1f} s")
    tokenizer = formatter.tokenizer

    raw: list[str] = []

    def classify(text: str) -> str:
        ids = torch.tensor([formatter.prompt_ids(text)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_id)
        raw.append(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
        return parse_label(raw[-1], formatter.labels)

    for text in texts[:2]:  # warm-up
        classify(text)
    raw.clear()
    predicted, started = [], time.perf_counter()
    for index, text in enumerate(texts):
        predicted.append(classify(text))
        if (index + 1) % 50 == 0:
            log(f"reference generate: {index + 1}/{len(texts)} rows")
    result = scored("seeds' generate (transformers" + (" + peft" if args.adapter else "") + ")", predicted, gold,
                    time.perf_counter() - started)
    result["raw_samples"] = raw[:10]  # what the model wrote, to see why answers are invalid
    log(f"reference: {result['examples_per_s']:.2f} examples/s, accuracy {result['accuracy']:.4f}; "
        f"first answers {raw[:3]}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    from minilora.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(args.model)
    splits = load_splits(args.data, args.seed)
    rows = splits.test[: args.rows] if args.rows else splits.test
    formatter = make_formatter_for(folder, args.prompt_format, splits.info.labels)
    texts, gold = [ex.text for ex in rows], [ex.label for ex in rows]
    log(f"{len(rows)} test rows, prompt format {'chat' if formatter.chat else 'plain'}, threads {threads}")

    minilora_methods = [m for m in args.methods if m != "reference"]
    results = run_minilora(args, folder, formatter, texts, gold, minilora_methods) if minilora_methods else {}
    skipped = None
    if "reference" in args.methods:
        skipped = reference_stack_missing()
        if skipped:
            log(f"reference: {skipped}")
        else:
            n_ref = min(args.limit, len(rows)) if args.limit else len(rows)
            try:
                results["reference"] = run_reference(args, folder, formatter, texts[:n_ref], gold[:n_ref])
            except Exception as err:  # noqa: BLE001 - the reference stack failing must not cost minilora's figures
                skipped = f"failed: {type(err).__name__}: {err}"
                log(f"reference: {skipped}")

    ref = results.get("reference")
    bound = None
    if "score" in results:
        from minilora.config import ModelConfig

        bound = score_flops(ModelConfig.from_file(folder / "config.json"), formatter, texts)
        bound["matmul_gflops_per_s"] = results["score"]["matmul_gflops_per_s"]
        bound["bound_examples_per_s"] = bound["matmul_gflops_per_s"] * 1e9 / bound["flops_per_row"]
        results["score"]["score_flops"] = bound
    table_rows = []
    for key, res in results.items():
        subset_acc = None
        if ref and key != "reference":  # this method's accuracy on the rows the reference saw
            n = ref["rows"]
            subset_acc = sum(p == g for p, g in zip(res["predicted"][:n], gold[:n])) / n
        table_rows.append([res["method"], res["rows"], res["examples_per_s"], res["accuracy"], res["invalid"],
                           subset_acc if key != "reference" else res["accuracy"],
                           res["examples_per_s"] / ref["examples_per_s"] if ref else None])
    subset_note = ""
    if ref and ref["rows"] < len(rows):
        subset_note = (f"\nseeds' generate ran on a subset: the first {ref['rows']} of {len(rows)} rows (--limit); "
                       "its examples/s and accuracy are for that subset only.")
    subset_header = f"accuracy on the first {ref['rows']} rows" if ref else "accuracy on the reference's rows"
    malloc = malloc_in_use()
    text = "\n".join([
        f"## Evaluation throughput: {args.model}{' + ' + args.adapter if args.adapter else ''}, "
        f"{len(rows)} test rows, {machine_label(threads)}, minilora batch {args.batch_size}, "
        f"malloc {malloc} (every method: one process)", "",
        markdown_table(["method", "rows", "examples / s", "accuracy", "invalid",
                        subset_header, "examples/s vs seeds' generate"], table_rows),
    ]) + subset_note
    if "generate" in results and ref:  # same greedy decoding: the parsed labels should agree
        same = sum(a == b for a, b in zip(results["generate"]["predicted"], ref["predicted"]))
        text += f"\nminilora generate and seeds' generate agree on {same} of {ref['rows']} parsed answers"
    if "score" in results and "score-int8" in results:
        same = sum(a == b for a, b in zip(results["score"]["predicted"], results["score-int8"]["predicted"]))
        text += f"\nscore-int8 predicts the same label as score on {same} of {len(rows)} rows"
    if "score" in results and ref:
        text += (f"\nratio score / seeds' generate (examples/s): "
                 f"{results['score']['examples_per_s'] / ref['examples_per_s']:.1f}x")
    if bound:
        achieved = results["score"]["examples_per_s"] * bound["flops_per_row"] / 1e9
        text += (f"\nscore's unavoidable matmul work: {bound['flops_per_row'] / 1e9:.2f} GFLOP per row "
                 f"({bound['mean_row_tokens']:.1f} tokens per row after the {bound['prefix_tokens']}-token shared "
                 f"prefix, label tokens {bound['label_tokens']}, LM head at 1 + continuation positions); at the "
                 f"fp32 2048^3 matmul rate probed before and after the score run "
                 f"({bound['matmul_gflops_per_s']:.0f} GFLOP/s) that allows at "
                 f"most {bound['bound_examples_per_s']:.1f} examples/s; score runs at {achieved:.0f} GFLOP/s "
                 f"({achieved / bound['matmul_gflops_per_s']:.0%} of it)")
        if ref:
            text += (f"; the bound is {bound['bound_examples_per_s'] / ref['examples_per_s']:.1f}x the seeds' "
                     "generate")
        if "score-int8" in results:  # the same matmul work, counted as if it were fp32
            equivalent = results["score-int8"]["examples_per_s"] * bound["flops_per_row"] / 1e9
            text += (f"\nscore-int8 does that work at {equivalent:.0f} fp32-equivalent GFLOP/s "
                     f"({equivalent / bound['matmul_gflops_per_s']:.0%} of the fp32 probe)")
    if skipped:
        text += f"\nreference: skipped ({skipped})"
    print(text, flush=True)
    write_json(args.json, {"args": vars(args), "environment": environment(), "results": results, "report": text,
                           "peak_rss_mb": peak_rss_mb(), "malloc": malloc, "reference_skipped": skipped})
    return 2 if skipped and skipped.startswith("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
