"""The benchmarks' useful-FLOP count (`benchmarks/common.py::step_flops`) against torch's FLOP counter.

The "useful / matmul" figure of bench_train.py is only as good as this count. On a batch without
checkpointing, every matmul the training step runs (projections, adapters, LM head; forward and
backward) must be what `step_flops` counts, no more and no less. Attention is left out here: torch's
counter charges SDPA the full (T x S) square of the padded layout, while `step_flops` counts the keys
each real token attends to. Also here: the machine name every report starts with (`cpu_model`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minilora.lora import LoraConfig, inject_adapters
from minilora.loss import completion_loss
from minilora.prompts import IGNORE_INDEX, Batch

from .tiny import hf_model, tiny_gemma_config, tiny_llama_config, twin

# lora_linear: an adapted projection's forward (its backward runs as aten matmuls); the count of its
# own formula is checked against the composed form in tests/test_lora_op.py
MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "minilora.lora_linear"}


def _bench_common():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(lengths: list[int], vocab: int, share_prefix: int, answer_tokens: int = 2, trailing: int = 0) -> Batch:
    """Right-padded rows; `answer_tokens` real tokens of each row are supervised, followed by
    `trailing` unsupervised ones."""
    gen = torch.Generator().manual_seed(1)
    length = max(lengths)
    input_ids = torch.randint(5, vocab, (len(lengths), length), generator=gen)
    input_ids[:, :share_prefix] = input_ids[0, :share_prefix]
    attention_mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, n in enumerate(lengths):
        answer = slice(n - trailing - answer_tokens, n - trailing)
        labels[row, answer] = input_ids[row, answer]
    return Batch(input_ids, attention_mask, labels, torch.ones(len(lengths)))


@pytest.mark.parametrize("trailing", [0, 2])
@pytest.mark.parametrize("share_prefix", [0, 4])
@pytest.mark.parametrize("kind", ["llama", "gemma3", "llama, one layer"])  # one layer: first and last at once
def test_step_flops_equals_the_matmuls_a_step_runs(kind, share_prefix, trailing):
    common = _bench_common()
    config = tiny_gemma_config() if kind == "gemma3" else tiny_llama_config()
    if kind == "llama, one layer":
        config = tiny_llama_config(num_hidden_layers=1)
    hf = hf_model(config)
    model = twin(hf)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=list(common.TARGETS)))
    model.train()
    lengths = [12, 10, 9]  # each row's answer is after the shared prefix, even with trailing tokens
    batch = _batch(lengths, model.config.vocab_size, share_prefix, trailing=trailing)

    with FlopCounterMode(display=False) as counter:
        completion_loss(model, batch, share_prefix).nll_sum.backward()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    counted = sum(flops for op, flops in by_op.items() if op in MATMUL_OPS)

    expected = common.step_flops(model.config, batch.attention_mask.sum(1).tolist(),
                                 common.supervised_positions(batch.labels), 4, common.TARGETS, share_prefix)
    assert expected["tokens_computed"] == (sum(lengths) - 2 * share_prefix)
    assert counted == expected["linear_and_lora"] + expected["lm_head"], by_op


def test_supervised_positions_are_where_the_head_predicts_a_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX],
                           [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9]])
    assert _bench_common().supervised_positions(labels) == [[1, 2], [0, 4]]


def test_step_flops_attention_counts_the_keys_each_supervised_position_sees():
    common = _bench_common()
    cfg = twin(hf_model(tiny_llama_config())).config  # 3 layers, all full attention
    per_key = 12 * cfg.num_heads * cfg.head_dim  # QK^T and AV, forward and backward
    # one row of 6 tokens, the head at position 2 only: the first two layers run every position
    # (1 + 2 + ... + 6 keys), the last layer's queries only position 2 (3 keys)
    assert common.step_flops(cfg, [6], [[2]], 4)["attention"] == (2 * 21 + 3) * per_key


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC 7B13
"""


@pytest.mark.parametrize("text, expected", [
    (AMD_CPUINFO, "AMD EPYC 7B13 (AVX2)"),
    ("model name : Intel(R) Xeon(R) Processor\nflags : sse avx2 avx512f avx512bw\n",
     "Intel(R) Xeon(R) Processor (AVX-512)"),
    ("model name : Some ARM core\nFeatures : fp asimd\n", "Some ARM core"),
])
def test_cpu_model_names_the_model_and_its_widest_vector_unit(tmp_path, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert _bench_common().cpu_model(cpuinfo) == expected


def test_cpu_model_falls_back_when_cpuinfo_is_missing(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "x86_64")
    assert _bench_common().cpu_model(tmp_path / "absent") == "x86_64"


def test_benchmark_numbers_are_checked_before_any_worker_runs():
    """--warmup-ratio 2 or --max-grad-norm -1 ran silently; --lora-dropout 1.5 failed in the worker, after loading."""
    import argparse

    float_in = _bench_common().float_in
    assert float_in(0, 1)("0.5") == 0.5 and float_in(0)("1e9") == 1e9
    for parse, text, message in ((float_in(0, 1), "2", r"must be in \[0, 1\], found 2.0"),
                                 (float_in(0, 1, high_open=True), "1", r"must be in \[0, 1\), found 1.0"),
                                 (float_in(0, low_open=True), "0", r"must be in \(0, inf\], found 0.0"),
                                 (float_in(0), "x", r"'x' is not a number"),
                                 (float_in(0), "inf", r"'inf' is not a finite number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_a_repeated_benchmark_configuration_is_refused(monkeypatch, capsys):
    """Runs are kept by label: `--configs mlp,mlp` merged into one row that claimed twice the rounds."""
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("bench_train", folder / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train", bench_train)
    spec.loader.exec_module(bench_train)
    for configs in ("mlp,selective,mlp", "selective+qlora+once,selective+once+qlora"):
        with pytest.raises(SystemExit):
            bench_train.parse_args(["--configs", configs])
        assert "--configs: a configuration is repeated" in capsys.readouterr().err
    assert [c for c in bench_train.parse_args(["--configs", "mlp,mlp+share"]).configs] == [("mlp",), ("mlp", "share")]
