"""Helpers shared by bench_train.py and bench_eval.py.

Nothing here imports torch at module level: the training benchmark's driver process stays small, so
the peak RSS a worker reports (`ru_maxrss`, which Linux carries across fork + exec) is the worker's own.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip"
if str(REPO) not in sys.path:  # run as `python benchmarks/bench_*.py` without installing minilora
    sys.path.insert(0, str(REPO))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the last layer runs these only where outputs are read (`outputs_at`); k / v run at every token
OUTPUT_ONLY_IN_LAST_LAYER = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------- process / system


def int_at_least(minimum: int):
    """An argparse `type`: an integer >= minimum, else argparse's one-line usage error."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, found {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse `type`: a number in [low, high] (( or ) where open), else argparse's one-line error,
    before any worker loads a model."""
    import argparse

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not (low < value if low_open else low <= value) or not (value < high if high_open else value <= high):
            shown = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {shown}, found {value}")
        return value

    return parse


def malloc_in_use() -> str:
    """The malloc this process runs on: a preloaded tcmalloc / jemalloc shows in its memory map."""
    with open("/proc/self/maps") as maps:
        text = maps.read()
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in text), "glibc")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: torch's default); returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def reference_stack_missing() -> str | None:
    """None when transformers and peft can be imported, else a one-line reason."""
    import importlib.util

    missing = [name for name in ("transformers", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -e .[bench]); the reference stack is skipped"
    return None


def run_worker(script: Path, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `python script args` (in `env`, default ours) and return the JSON object of the last stdout
    line that is one.

    The worker's stderr goes straight to ours (progress lines); a failing worker raises RuntimeError."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        shown = f"; stdout tail:\n{tail}" if tail.strip() else " (its error is above, on stderr)"
        raise RuntimeError(f"worker {' '.join(cmd[2:])} exited with {proc.returncode}{shown}")
    return json.loads(lines[-1])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- data, model


def load_splits(data: str | Path, seed: int = 42):
    """FinancialPhraseBank with the default seed protocol: 900 train / 900 test rows (300 per class)."""
    from minilora.data import load_dataset

    return load_dataset(str(data), seed=seed)


def make_formatter_for(folder: Path, prompt_format: str, labels: tuple[str, ...]):
    """minilora's PromptFormatter for a checkpoint folder (both stacks tokenize through it)."""
    from minilora.finetune import make_formatter
    from minilora.tokenizer import Tokenizer

    return make_formatter(Tokenizer(folder), prompt_format, None, labels)


# ------------------------------------------------------------------------------------------- FLOPs


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer of a minilora ModelConfig."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def supervised_positions(labels) -> list[list[int]]:
    """Per row of a (B, T) label tensor, the positions where the LM head runs: t whose next token,
    labels[t + 1], is supervised (IGNORE_INDEX elsewhere)."""
    from minilora.prompts import IGNORE_INDEX  # here, not at the top: this module stays torch-free

    return [[int(j) - 1 for j in (row != IGNORE_INDEX).nonzero().flatten()] for row in labels]


def step_flops(cfg, lengths: list[int], supervised: list[list[int]], r: int, targets=TARGETS,
               shared_prefix: int = 0) -> dict[str, float]:
    """Useful FLOPs of one training step (forward + backward) of a batch of rows, from the config.

    lengths[b]: real (non-pad) tokens of row b; supervised[b]: the positions of row b whose next token
    is supervised, where the LM head runs (`supervised_positions`). Per real token and layer:

    * frozen projections: 2 * P_linear forward + 2 * P_linear backward (activation gradients only:
      the base weights get no gradient);
    * LoRA: 2 * r * (in + out) forward, 4 * r * (in + out) backward (activation and A / B gradients);
    * attention: 2 * 2 * ctx * n_heads * head_dim forward (QK^T and AV), twice that backward, with ctx
      the keys the token really attends to (t + 1 for position t, capped by the sliding window):
      the exact causal sum, not a full T x T square.

    Except in the first layer: q / k / v read the frozen embeddings (through a norm), so nothing
    asks for their input gradient, and neither their 2 * P_qkv backward nor their adapters' 2 * r * in
    of it is run.
    Except in the last layer: only k / v are needed at every token; q, attention, o and the MLP
    run only at the supervised positions (`outputs_at`, positions.Selection), wherever they are in
    the row.
    Plus the LM head at supervised positions only: 2 * H * V forward + 2 * H * V backward.
    Not counted: gradient-checkpoint recomputation, padding, positions whose outputs are not needed,
    norms / activations / softmax / RoPE (elementwise), the optimizer. shared_prefix = P > 0 counts
    the first P tokens once for the whole batch (what --share-prefix computes; none of them is
    supervised). tests/test_bench_flops.py checks the projection, adapter and head part against
    torch's counter.
    """
    shapes = linear_shapes(cfg)
    p_linear = sum(a * b for a, b in shapes.values())
    p_lora = sum(r * (a + b) for name, (a, b) in shapes.items() if name in targets)
    first_layer_inputs = ("q_proj", "k_proj", "v_proj")  # read the embeddings: no input gradient
    no_input_grad = sum(2 * a * b + (2 * r * a if name in targets else 0)
                        for name, (a, b) in shapes.items() if name in first_layer_inputs)
    per_token = cfg.num_layers * (4 * p_linear + 6 * p_lora) - no_input_grad
    attn_unit = 12 * cfg.num_heads * cfg.head_dim  # (4 forward + 8 backward) per key attended to
    window = cfg.sliding_window

    def keys_visible(positions, kind: str) -> int:
        """Sum over the positions t of the keys t attends to."""
        if kind == "sliding_attention" and window is not None:
            return sum(min(t + 1, window) for t in positions)
        return sum(t + 1 for t in positions)

    last = cfg.layer_types[-1]
    tokens = attention = 0
    for row, length in enumerate(lengths):
        start = shared_prefix if row > 0 else 0  # rows after the first reuse the prefix keys / values
        tokens += length - start
        attention += sum(keys_visible(range(start, length), kind) for kind in cfg.layer_types[:-1]) * attn_unit
        attention += keys_visible(supervised[row], last) * attn_unit
    n_supervised = sum(len(positions) for positions in supervised)
    # last layer: q, o and the MLP (forward and backward, adapters included) at supervised positions only
    last_layer_only_selected = sum(4 * a * b + (6 * r * (a + b) if name in targets else 0)
                                   for name, (a, b) in shapes.items() if name in OUTPUT_ONLY_IN_LAST_LAYER)
    body = tokens * per_token - (tokens - n_supervised) * last_layer_only_selected
    if cfg.num_layers == 1:  # the first layer is the last: q's skipped input gradient was taken off twice
        a, b = shapes["q_proj"]
        body += (tokens - n_supervised) * (2 * a * b + (2 * r * a if "q_proj" in targets else 0))
    head = n_supervised * 4 * cfg.hidden_size * cfg.vocab_size
    return {"total": body + attention + head, "linear_and_lora": body, "attention": attention, "lm_head": head,
            "tokens_computed": tokens}


class MatmulProbe:
    """fp32 torch.mm rate of n x n @ n x n (same threads as the caller), on buffers allocated once.

    The benchmarks call it between timed steps, so each step's work is compared with the machine's
    matmul rate at that moment: this machine's speed drifts by up to 1.5x within minutes, and one probe
    at the end of a run can land in a faster or slower phase than the steps it is compared with."""

    def __init__(self, n: int = 2048):
        import torch

        self.n = n
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.out = torch.mm(self.a, self.b)  # also the warm-up

    def gflops(self, seconds: float) -> float:
        """Rate over at least one product, repeated for about `seconds`."""
        import torch

        count, started = 0, time.perf_counter()
        while True:
            torch.mm(self.a, self.b, out=self.out)
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return count * 2 * self.n**3 / elapsed / 1e9


# ------------------------------------------------------------------------------------------ report


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
        log(f"wrote {path}")


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name and widest vector unit, e.g. "AMD EPYC 7B13 (AVX2)", from the first
    "model name" and "flags" of `cpuinfo` (else `platform.processor()`). Reports name it: a session
    may land on another kind of machine, and ratios as well as absolute times move with it."""
    import platform

    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    vector = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    return f"{name} ({vector})" if vector else name


def machine_label(threads: int) -> str:
    """e.g. "AMD EPYC 7B13 (AVX2), 2 cores, threads 2": the machine a report's numbers come from
    (torch-free, so the training driver can write it without importing torch)."""
    return f"{cpu_model()}, {os.cpu_count()} cores, threads {threads}"


def environment() -> dict:
    """Machine facts worth keeping next to the numbers."""
    import importlib.metadata
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_1m": os.getloadavg()[0]}
    for name in ("transformers", "peft"):  # versions from metadata: importing them would inflate RSS
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info
