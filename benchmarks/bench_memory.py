"""Peak host memory of loading and of LoRA training steps, full precision vs QLoRA (NF4).

Usage:
    python benchmarks/bench_memory.py [--model gemma-3-270m] [--smoke] [--json OUT] [--steps N]

What is measured (CPU, the packaged Gemma 3 270M by default):

1. Loading. `load_model` with the same per-layer hook `finetune.build_model` installs: none for the
   fp32 base, `quantize_module_nf4` on each decoder layer right after it is loaded for QLoRA (the
   tokenizer that `build_model` also loads is measured on its own, after the weights). Reported:
   - peak RSS growth: `ru_maxrss` at the end minus the RSS right before loading (after
     `import torch, minilora` and the minilora submodules used, bitsandbytes included);
   - the same peak split into anonymous memory (private allocations) and file-backed pages (the
     safetensors file, which is memory-mapped), sampled from /proc/self/status every 2 ms;
   - RSS growth after every parameter and buffer has been read once (what any forward needs
     resident), and the bytes of parameters + buffers the model holds (NF4: packed codes + quant
     state: absmax, nested absmax, code books).
2. Training. LoRA r=16 (alpha 32, dropout 0.05) on the seven linear projections of every block,
   batch 8, at sequence lengths 128 and 512, with and without gradient checkpointing, fp32 base;
   QLoRA with checkpointing at both lengths. Batches are synthetic rows of exactly that length
   (random token ids, all attended, the last 3 positions supervised), since real FinancialPhraseBank
   prompts never reach 512 tokens; each step is `trainer.accumulate_gradients` (forward + backward
   of the completion loss; no optimizer step, whose AdamW state would add 2 x 4 bytes per adapter
   parameter). Peak RSS growth is over the loaded model with every weight already resident, and the
   time per step is informative only (it depends on what else runs on the machine).

Why a fresh subprocess per measurement: peak RSS is a per-process high-water mark that never goes
down, and the allocator keeps freed memory around, so a second measurement in the same process
would see the first one's peak and heap. Each worker also resets its high-water mark right before
the measured phase (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) so that import and load peaks do
not hide a smaller training peak.

Allocator caveat: RSS counts what glibc malloc keeps, not only live tensors. With its default
dynamic mmap threshold, freed large blocks stay in the heap and fragment, so a training step's RSS
peak can be far above its live-tensor peak (measured on this model, seq 128 batch 8 with
checkpointing: about 1.1 GB by default vs about 0.2 GB with `--malloc-mmap-threshold 1048576`,
which sets MALLOC_MMAP_THRESHOLD_ in the workers so that every block >= 1 MiB is mmapped and handed
back to the OS when freed). The default measures what a user of this machine sees; the option gets
closer to what the computation needs.

`--smoke` (CI): sequence length 32, batch 2, one step, only the fp32 load and one fp32 training
configuration (gradient checkpointing on); a couple of minutes at most, exit status 0 unless a worker
fails. `--parts`, `--seq-lens`, `--batch` and `--steps` run a subset or other sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import int_at_least  # this script's folder is on sys.path when it runs

MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
SUPERVISED = 3  # supervised positions at the end of each synthetic row
LORA_R = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------ memory probes


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def maxrss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Reset the RSS high-water mark (VmHWM and ru_maxrss) to the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Peak RssAnon / RssFile / VmRSS sampled in a background thread (short spikes may be missed)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, proc_status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = proc_status()
            for key, value in now.items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in proc_status().items():
            self.peak[key] = max(self.peak.get(key, 0), value)


# ------------------------------------------------------------------------------------ workers


def _imports():
    """Everything a worker uses, imported before the 'before' RSS is read."""
    import torch

    import minilora  # noqa: F401
    from minilora import checkpoint, finetune, lora, prompts, quant, trainer  # noqa: F401

    return torch


def _hook(torch, qlora: bool):
    """The per-layer hook of `finetune.build_model` (device cpu)."""
    from minilora.quant import quantize_module_nf4

    if not qlora:
        return None
    return lambda layer: quantize_module_nf4(layer, compute_dtype=torch.float32, device=torch.device("cpu"))


def held_bytes(model) -> dict[str, int]:
    """Bytes of parameters + buffers (distinct storages) and NF4 quant state, by kind."""
    from minilora.quant import NF4Linear

    seen: set[int] = set()
    parts = {"embedding": 0, "nf4_codes": 0, "nf4_quant_state": 0, "other_float": 0}

    def add(kind: str, tensor) -> None:
        if tensor is None or tensor.device.type == "meta":
            return
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            return
        seen.add(key)
        parts[kind] += tensor.numel() * tensor.element_size()

    embedding = model.model.embed_tokens.weight
    add("embedding", embedding)
    for module in model.modules():
        if isinstance(module, NF4Linear):
            add("nf4_codes", module.weight_nf4)
            state = module.quant_state
            for tensor in (state.absmax, state.code, getattr(state, "offset", None)):
                add("nf4_quant_state", tensor)
            if getattr(state, "state2", None) is not None:
                add("nf4_quant_state", state.state2.absmax)
                add("nf4_quant_state", state.state2.code)
    for tensor in list(model.parameters()) + list(model.buffers()):
        add("other_float", tensor)
    parts["total"] = sum(parts.values())
    return parts


def parameter_counts(model) -> dict[str, int]:
    """Logical parameter counts: embedding, block linear weights (what NF4 quantizes), the rest."""
    from minilora.quant import NF4Linear

    embedding = model.model.embed_tokens.weight.numel()
    linear = 0
    for module in model.model.layers.modules():
        if isinstance(module, NF4Linear):
            linear += module.in_features * module.out_features
        elif type(module).__name__ == "Linear":
            linear += module.weight.numel()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    head = model.lm_head.weight
    untied_head = 0 if head is model.model.embed_tokens.weight else head.numel()
    return {"embedding": embedding, "block_linear": linear, "lm_head": untied_head,
            "other": total - embedding - linear - untied_head, "total": total, "vocab": head.shape[0]}


def touch(torch, model) -> None:
    """Read every parameter and buffer once, so memory-mapped weights become resident."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.dtype.is_floating_point:
                tensor.sum()
            else:
                tensor.view(-1)[:: max(1, 4096 // max(1, tensor.element_size()))].sum()


def worker_load(args: dict) -> dict:
    torch = _imports()
    from minilora.checkpoint import load_model
    from minilora.tokenizer import Tokenizer

    before = proc_status()
    reset = reset_peak()
    with Sampler() as sampler:
        start = time.perf_counter()
        loaded = load_model(args["model"], dtype=torch.float32, device="cpu",
                            on_layer_loaded=_hook(torch, args["qlora"]))
        seconds = time.perf_counter() - start
    peak = maxrss()
    after = proc_status()
    touch(torch, loaded.model)
    touched = proc_status()
    result = {
        "kind": "load", "variant": "nf4" if args["qlora"] else "fp32", "seconds": seconds, "hwm_reset": reset,
        "rss_before_mb": before["VmRSS"] / MB,
        "peak_growth_mb": (peak - before["VmRSS"]) / MB,
        "peak_anon_growth_mb": (sampler.peak["RssAnon"] - before["RssAnon"]) / MB,
        "peak_file_growth_mb": (sampler.peak["RssFile"] - before["RssFile"]) / MB,
        "after_growth_mb": (after["VmRSS"] - before["VmRSS"]) / MB,
        "after_anon_growth_mb": (after["RssAnon"] - before["RssAnon"]) / MB,
        "after_file_growth_mb": (after["RssFile"] - before["RssFile"]) / MB,
        "touched_growth_mb": (touched["VmRSS"] - before["VmRSS"]) / MB,
        "touched_anon_growth_mb": (touched["RssAnon"] - before["RssAnon"]) / MB,
        "touched_file_growth_mb": (touched["RssFile"] - before["RssFile"]) / MB,
        "held_mb": {k: v / MB for k, v in held_bytes(loaded.model).items()},
        "params": parameter_counts(loaded.model),
    }
    # build_model also loads the tokenizer: measured separately, after the weights
    tok_before = proc_status()
    reset_peak()
    start = time.perf_counter()
    Tokenizer(loaded.folder)
    result["tokenizer_seconds"] = time.perf_counter() - start
    result["tokenizer_peak_growth_mb"] = (maxrss() - tok_before["VmRSS"]) / MB
    result["tokenizer_after_growth_mb"] = (proc_status()["VmRSS"] - tok_before["VmRSS"]) / MB
    return result


def worker_train(args: dict) -> dict:
    torch = _imports()
    import gc

    from minilora.checkpoint import load_model
    from minilora.lora import LoraConfig, adapter_parameters, inject_adapters
    from minilora.prompts import IGNORE_INDEX, Batch
    from minilora.trainer import accumulate_gradients

    torch.manual_seed(0)
    loaded = load_model(args["model"], dtype=torch.float32, device="cpu", on_layer_loaded=_hook(torch, args["qlora"]))
    model = loaded.model
    inject_adapters(model, LoraConfig(r=LORA_R, alpha=2 * LORA_R, dropout=0.05, target_modules=list(TARGETS)))
    model.gradient_checkpointing = args["checkpointing"]
    model.train()
    trainable = sum(p.numel() for p in adapter_parameters(model))

    batch_size, length = args["batch"], args["seq"]
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, loaded.config.vocab_size, (batch_size, length), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -SUPERVISED:] = input_ids[:, -SUPERVISED:]
    batch = Batch(input_ids, torch.ones_like(input_ids), labels, torch.ones(batch_size))
    device = torch.device("cpu")

    touch(torch, model)  # the memory-mapped fp32 weights are resident from here on, as in a real run
    gc.collect()
    baseline = proc_status()
    reset = reset_peak()
    times, losses = [], []
    with Sampler() as sampler:
        for _ in range(args["steps"]):
            start = time.perf_counter()
            loss, *_ = accumulate_gradients(model, [batch], device)
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            losses.append(loss)
    peak = maxrss()
    return {
        "kind": "train", "variant": "nf4" if args["qlora"] else "fp32", "seq": length, "batch": batch_size,
        "checkpointing": args["checkpointing"], "steps": args["steps"], "hwm_reset": reset,
        "trainable_params": trainable,
        "baseline_rss_mb": baseline["VmRSS"] / MB,
        "peak_growth_mb": (peak - baseline["VmRSS"]) / MB,
        "peak_anon_growth_mb": (sampler.peak["RssAnon"] - baseline["RssAnon"]) / MB,
        "step_seconds": times,
        # the first step includes one-off work (thread pools, allocator growth): time the later ones
        "seconds_per_step": sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0],
        "loss": losses[-1],
    }


def run_worker(job: dict, timeout: float, mmap_threshold: int | None = None) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {**job, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


# ------------------------------------------------------------------------------------ report


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "dtype": "fp32"}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        pass
    return info


def fmt(value, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def tables(loads: list[dict], trains: list[dict]) -> list[str]:
    out = ["| phase | configuration | peak RSS growth (MB) | of which anon (MB) | resident after (MB) | "
           "held params+buffers (MB) | time (s) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in loads:
        name = "fp32 (full precision)" if r["variant"] == "fp32" else "NF4 (QLoRA, per-layer quantization)"
        if "error" in r:
            out.append(f"| load | {name} | error | | | | |")
            continue
        out.append(f"| load | {name} | {fmt(r['peak_growth_mb'])} | {fmt(r['peak_anon_growth_mb'])} | "
                   f"{fmt(r['touched_growth_mb'])} | {fmt(r['held_mb']['total'])} | {r['seconds']:.1f} |")
    for r in trains:
        name = (f"{'fp32' if r['variant'] == 'fp32' else 'QLoRA NF4'} LoRA r{LORA_R}, seq {r['seq']}, "
                f"batch {r['batch']}, checkpointing {'on' if r['checkpointing'] else 'off'}")
        if "error" in r:
            out.append(f"| train step | {name} | error | | | | |")
            continue
        out.append(f"| train step | {name} | {fmt(r['peak_growth_mb'])} | {fmt(r['peak_anon_growth_mb'])} | "
                   f"{fmt(r['baseline_rss_mb'])} (baseline) | | {r['seconds_per_step']:.2f} |")
    return out


def details(loads: list[dict], trains: list[dict], info: dict) -> list[str]:
    out = ["", "## Details", "",
           f"Machine: {info['cpu']}, {info['cores']} cores, torch {info.get('torch', '?')} "
           f"({info.get('torch_threads', '?')} threads), fp32 compute on CPU; load average (1/5/15 min) at start "
           f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_start', ()))}, at the end "
           f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_end', ()))}"
           + (" (above the core count: other processes shared the CPU, step times are inflated)."
              if max(info.get("loadavg_start", (0,))[0], info.get("loadavg_end", (0,))[0]) > (info["cores"] or 1)
              else "."),
           "Peak RSS growth: ru_maxrss minus the RSS right before the phase (load: after the imports; training: "
           "the loaded model with adapters and every weight resident). 'of which anon' is the peak of RssAnon "
           "(private allocations) sampled every 2 ms; the rest is file-backed pages of the memory-mapped "
           "safetensors file, which are clean page cache the kernel can drop and re-read. 'resident after' for "
           "loads: RSS growth once every weight has been read (what a forward needs); for training: the baseline RSS.",
           "Allocator: " + (f"MALLOC_MMAP_THRESHOLD_={info['malloc_mmap_threshold']} (blocks that large go back to "
                            "the OS when freed: RSS close to the live tensors)." if info.get("malloc_mmap_threshold")
                            else "glibc defaults (dynamic mmap threshold): freed blocks are kept and fragment, so "
                            "training peaks include allocator slack; --malloc-mmap-threshold 1048576 measures closer "
                            "to the live tensors.")]
    ok = {r["variant"]: r for r in loads if "error" not in r}
    if "fp32" in ok:
        p = ok["fp32"]["params"]
        best_saving = (1 - 4.127 / 32) * p["block_linear"] / p["total"]
        head = f"an untied LM head {p['lm_head'] / 1e6:.1f}M, " if p.get("lm_head") else ""
        tying = "its own LM head beside it" if p.get("lm_head") else "tied with the LM head"
        out += ["", f"Parameters: {p['total'] / 1e6:.1f}M in all; embedding {p['embedding'] / 1e6:.1f}M "
                f"({100 * p['embedding'] / p['total']:.0f}%, {tying}), {head}linear projections of the "
                f"transformer blocks {p['block_linear'] / 1e6:.1f}M ({100 * p['block_linear'] / p['total']:.0f}%), "
                f"norms {p['other'] / 1e6:.2f}M. QLoRA quantizes only the block projections; the embedding "
                f"stays in the compute dtype (and so does the LM head), so NF4 can only "
                f"shrink the {4 * p['block_linear'] / MB:,.0f} MB of fp32 block weights, to about an eighth "
                f"(~4.13 of 32 bits per weight with double quantization: "
                f"{4.127 / 8 * p['block_linear'] / MB:,.0f} MB), never the {4 * p['embedding'] / MB:,.0f} MB "
                f"embedding: a saving of at most {100 * best_saving:.0f}% "
                f"of the fp32 model's bytes."]
    for variant, r in ok.items():
        h = r["held_mb"]
        out += ["", f"Load {variant}: {r['seconds']:.1f} s; held parameters+buffers {h['total']:,.1f} MB = "
                f"embedding {h['embedding']:,.1f} + NF4 codes {h['nf4_codes']:,.1f} + NF4 quant state "
                f"{h['nf4_quant_state']:,.1f} + other float {h['other_float']:,.1f}. RSS before loading "
                f"{r['rss_before_mb']:,.0f} MB. Peak growth {r['peak_growth_mb']:,.0f} MB (anon "
                f"{r['peak_anon_growth_mb']:,.0f}, file-backed {r['peak_file_growth_mb']:,.0f}); right after "
                f"loading +{r['after_growth_mb']:,.0f} MB (anon {r['after_anon_growth_mb']:,.0f}, file "
                f"{r['after_file_growth_mb']:,.0f}); after reading every weight +{r['touched_growth_mb']:,.0f} MB "
                f"(anon {r['touched_anon_growth_mb']:,.0f}, file {r['touched_file_growth_mb']:,.0f})."
                + ("" if r["hwm_reset"] else " (high-water mark could not be reset: peak may include imports)")]
        if "tokenizer_peak_growth_mb" in r:
            vocab = f"{ok['fp32']['params']['vocab']:,}-token vocabulary" if "fp32" in ok else "its vocabulary"
            out.append(f"  build_model also loads the tokenizer ({vocab}): +"
                       f"{r['tokenizer_peak_growth_mb']:,.0f} MB peak, +{r['tokenizer_after_growth_mb']:,.0f} MB "
                       f"kept, {r['tokenizer_seconds']:.1f} s; not included above.")
    if "fp32" in ok and "nf4" in ok:
        full, nf4 = ok["fp32"]["held_mb"]["total"], ok["nf4"]["held_mb"]["total"]
        out += ["", f"Bottom line: the model holds {full:,.0f} MB (fp32) vs {nf4:,.0f} MB (NF4), "
                f"{full - nf4:,.0f} MB or {100 * (1 - nf4 / full):.0f}% less. Peak RSS of loading does not show "
                f"that saving on this path (fp32 {ok['fp32']['peak_growth_mb']:,.0f} MB vs NF4 "
                f"{ok['nf4']['peak_growth_mb']:,.0f} MB; resident once used: {ok['fp32']['touched_growth_mb']:,.0f} "
                f"vs {ok['nf4']['touched_growth_mb']:,.0f} MB), because of the memory mapping explained next."]
    if ok:
        out += ["", "Why fp32 loading barely moves RSS: the checkpoint is fp32 and safetensors maps it, so "
                "load_model's parameters are views of the file mapping (no copy). Pages become resident only when "
                "read, as file-backed memory; 'resident after' shows the real working set. With QLoRA each block's "
                "fp32 weights are read (faulted in) to be quantized and the new NF4 tensors are private memory; "
                "the embedding is still a view of the mapping, which keeps the whole file mapped, so the block "
                "weights' pages stay counted in RSS (file-backed, reclaimable) after quantization. The anonymous "
                "columns are what the process really allocates."]
    good = [r for r in trains if "error" not in r]
    if good:
        out += ["", f"Training: LoRA r={LORA_R}, alpha {2 * LORA_R}, dropout 0.05 on {', '.join(TARGETS)} of every "
                f"block ({good[0]['trainable_params']:,} trainable parameters); synthetic rows of exactly the "
                f"sequence length (random ids, all attended), the last {SUPERVISED} positions supervised; "
                f"{good[0]['steps']} step(s) of forward + backward (`accumulate_gradients`), gradients freed after "
                "each step, no optimizer. Time per step excludes the first step when there are several, and is "
                "informative only (shared CPU)."]
        index = {(r["variant"], r["seq"], r["checkpointing"]): r for r in good}
        for (variant, seq, ckpt), r in sorted(index.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            if ckpt or (variant, seq, True) not in index:
                continue
            with_ckpt = index[(variant, seq, True)]
            saved = r["peak_growth_mb"] - with_ckpt["peak_growth_mb"]
            out.append(f"  {variant} seq {seq}: checkpointing saves {saved:,.0f} MB of peak "
                       f"({r['peak_growth_mb']:,.0f} -> {with_ckpt['peak_growth_mb']:,.0f} MB) for "
                       f"{with_ckpt['seconds_per_step'] / r['seconds_per_step']:.2f}x the step time.")
        for r in good:
            out.append(f"  {r['variant']} seq {r['seq']} ckpt {'on' if r['checkpointing'] else 'off'}: baseline RSS "
                       f"{r['baseline_rss_mb']:,.0f} MB, peak growth {r['peak_growth_mb']:,.0f} MB (anon "
                       f"{r['peak_anon_growth_mb']:,.0f}), steps {', '.join(f'{t:.2f}' for t in r['step_seconds'])} s, "
                       f"loss {r['loss']:.3f}, worker wall {r.get('wall_s', 0):.0f} s.")
        out.append("  Without checkpointing autograd keeps every block's intermediate activations (attention "
                   "projections, the MLP's intermediate-wide tensors, norms) for every block; with it only each "
                   "block's input is kept "
                   "and one block is recomputed at a time in backward, so the saving grows with batch x length.")
        if any(r["variant"] == "nf4" for r in good):
            out.append("  QLoRA: each NF4 weight is dequantized to the compute dtype in the forward and again in the "
                       "checkpoint replay, and only one block's dequantized weights are alive at a time "
                       "(minilora.quant._NF4Matmul); its baseline also includes the block weights' file pages "
                       "(see loading).")
    errors = [r for r in loads + trains if "error" in r]
    for r in errors:
        out.append(f"ERROR {r}")
    return out


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="packaged short name, local HF folder or Hub id")
    parser.add_argument("--smoke", action="store_true", help="seq 32, batch 2, fp32 load + one training config")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--steps", type=int_at_least(1), default=None,
                        help="training steps per config (default 2; smoke 1)")
    parser.add_argument("--parts", default="load,train,qlora-train",
                        help="comma-separated subset of load, train (fp32 LoRA), qlora-train (ignored with --smoke)")
    parser.add_argument("--seq-lens", default="128,512", help="training sequence lengths (ignored with --smoke)")
    parser.add_argument("--batch", type=int_at_least(1), default=8, help="training batch size (ignored with --smoke)")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ in the workers (glibc): blocks this large are returned "
                             "to the OS when freed, so RSS tracks live tensors (default: glibc's dynamic threshold)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        result = (worker_load if job["kind"] == "load" else worker_train)(job)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.smoke:
        steps = args.steps or 1
        load_jobs = [{"kind": "load", "model": args.model, "qlora": False}]
        train_jobs = [{"kind": "train", "model": args.model, "qlora": False, "seq": 32, "batch": 2,
                       "checkpointing": True, "steps": steps}]
    else:
        steps = args.steps or 2
        parts = {p.strip() for p in args.parts.split(",") if p.strip()}
        unknown = parts - {"load", "train", "qlora-train"}
        if unknown:
            parser.error(f"--parts: unknown {sorted(unknown)}; expected load, train, qlora-train")
        try:
            seqs = [int_at_least(1)(x) for x in args.seq_lens.split(",") if x.strip()]
        except argparse.ArgumentTypeError as err:
            parser.error(f"--seq-lens: {err}")
        if not seqs:
            parser.error("--seq-lens: no sequence length given")
        load_jobs = [{"kind": "load", "model": args.model, "qlora": q} for q in (False, True) if "load" in parts]
        train_jobs = []
        if "train" in parts:
            train_jobs += [{"kind": "train", "model": args.model, "qlora": False, "seq": seq, "batch": args.batch,
                            "checkpointing": ckpt, "steps": steps} for seq in seqs for ckpt in (False, True)]
        if "qlora-train" in parts:
            train_jobs += [{"kind": "train", "model": args.model, "qlora": True, "seq": seq, "batch": args.batch,
                            "checkpointing": True, "steps": steps} for seq in seqs]

    info = machine()
    info["malloc_mmap_threshold"] = args.malloc_mmap_threshold or os.environ.get("MALLOC_MMAP_THRESHOLD_")
    started = time.perf_counter()
    jobs = load_jobs + train_jobs
    results = []
    for number, job in enumerate(jobs, 1):
        label = {k: v for k, v in job.items() if k not in ("model", "kind")}
        print(f"[{number}/{len(jobs)}] {job['kind']} {label} ...", file=sys.stderr, flush=True)
        result = run_worker(job, args.timeout, args.malloc_mmap_threshold)
        results.append(result)
        status = result.get("error") or f"peak +{result['peak_growth_mb']:,.0f} MB, {result.get('wall_s', 0):.0f} s"
        print(f"    {status}", file=sys.stderr, flush=True)
    info["duration_s"] = time.perf_counter() - started
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    loads = [r for r in results if r["kind"] == "load"]
    trains = [r for r in results if r["kind"] == "train"]

    title = f"# Memory benchmark: {args.model}{' (smoke)' if args.smoke else ''}"
    print("\n".join([title, ""] + tables(loads, trains) + details(loads, trains, info)))
    print(f"\nTotal {info['duration_s']:.0f} s.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "smoke": args.smoke, "machine": info,
                                         "load": loads, "train": trains}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
