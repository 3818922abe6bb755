"""The benchmarks' useful-FLOP count (`benchmarks/common.py::step_flops`) against torch's FLOP counter.

The "useful / matmul" figure of bench_train.py is only as good as this count. On a batch without
checkpointing, every matmul the training step runs (projections, adapters, LM head; forward and
backward) must be what `step_flops` counts, no more and no less. Attention is left out here: torch's
counter charges SDPA the full (T x S) square of the padded layout, while `step_flops` counts the keys
each real token attends to.
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


def _batch(lengths: list[int], vocab: int, share_prefix: int, answer_tokens: int = 2) -> Batch:
    """Right-padded rows; the last `answer_tokens` real tokens of each row are supervised."""
    gen = torch.Generator().manual_seed(1)
    length = max(lengths)
    input_ids = torch.randint(5, vocab, (len(lengths), length), generator=gen)
    input_ids[:, :share_prefix] = input_ids[0, :share_prefix]
    attention_mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, n in enumerate(lengths):
        labels[row, n - answer_tokens : n] = input_ids[row, n - answer_tokens : n]
    return Batch(input_ids, attention_mask, labels, torch.ones(len(lengths)))


@pytest.mark.parametrize("share_prefix", [0, 4])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_step_flops_equals_the_matmuls_a_step_runs(kind, share_prefix):
    common = _bench_common()
    hf = hf_model(tiny_llama_config() if kind == "llama" else tiny_gemma_config())
    model = twin(hf)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=list(common.TARGETS)))
    model.train()
    batch = _batch([12, 9, 7], model.config.vocab_size, share_prefix)

    with FlopCounterMode(display=False) as counter:
        completion_loss(model, batch, share_prefix).nll_sum.backward()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    counted = sum(flops for op, flops in by_op.items() if op in MATMUL_OPS)

    expected = common.step_flops(model.config, batch.attention_mask.sum(1).tolist(),
                                 (batch.labels != IGNORE_INDEX).sum(1).tolist(), 4, common.TARGETS, share_prefix)
    assert expected["tokens_computed"] == (sum([12, 9, 7]) - 2 * share_prefix)
    assert counted == expected["linear_and_lora"] + expected["lm_head"], by_op
