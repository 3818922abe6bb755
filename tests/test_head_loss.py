"""The chunked LM head + cross-entropy (minilora/head_loss.py) against the composed form."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import minilora.head_loss
import minilora.loss
from minilora.head_loss import _ChunkedHeadCrossEntropy, head_cross_entropy, head_log_probs_at
from minilora.lora import LoraConfig, inject_adapters
from minilora.loss import completion_loss
from minilora.prompts import IGNORE_INDEX, Batch

from .tiny import hf_model, nonzero_lora_B_, tiny_gemma_config, tiny_llama_config, twin


def _composed(hidden, weight, targets):
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))  # float64 stays
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)


@pytest.mark.parametrize("chunk", [128, 1000, 4096])  # 1000 / 128 is not whole; 4096 > V: one chunk
def test_loss_gradient_and_prediction_equal_the_composed_form(chunk):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 32, generator=gen)
    hidden = (torch.randn(7, 32, generator=gen) * 0.5).requires_grad_()
    targets = torch.randint(0, 1000, (7,), generator=gen)
    upstream = torch.rand(7, generator=gen)  # per-row weights, as the loss's token weights

    nll, predicted = _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk)
    (grad,) = torch.autograd.grad((nll * upstream).sum(), hidden)
    # the truth in float64
    hidden64 = hidden.detach().double().requires_grad_()
    nll64, predicted64 = _composed(hidden64, weight.double(), targets)
    (grad64,) = torch.autograd.grad((nll64 * upstream.double()).sum(), hidden64)

    torch.testing.assert_close(nll.double(), nll64, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)
    assert torch.equal(predicted, predicted64)
    assert nll.dtype == torch.float32 and grad.dtype == hidden.dtype


def test_prediction_ties_keep_the_first_index_across_chunks():
    weight = torch.zeros(300, 4)
    weight[[40, 250], 0] = 1.0  # the same top logit in chunk 0 and in chunk 1 (chunk = 128)
    hidden = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    _, predicted = _ChunkedHeadCrossEntropy.apply(hidden, weight, torch.tensor([3]), 128)
    assert predicted.tolist() == [40] == (hidden @ weight.t()).argmax(-1).tolist()


def test_bf16_head_sums_in_fp32():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(700, 16, generator=gen).bfloat16()
    hidden = torch.randn(5, 16, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 700, (5,), generator=gen)
    nll, _ = _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, 256)
    (grad,) = torch.autograd.grad(nll.sum(), hidden)
    reference_hidden = hidden.detach().float().requires_grad_()
    reference, _ = _composed(reference_hidden, weight.float(), targets)
    (reference_grad,) = torch.autograd.grad(reference.sum(), reference_hidden)
    assert grad.dtype == torch.bfloat16 and nll.dtype == torch.float32
    torch.testing.assert_close(nll, reference, rtol=2e-2, atol=2e-2)  # bf16 products
    torch.testing.assert_close(grad.float(), reference_grad, rtol=2e-2, atol=2e-2)


def _batch(vocab: int) -> Batch:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, vocab, (3, 12), generator=gen)
    attention_mask = (torch.arange(12)[None] < torch.tensor([[12], [9], [7]])).long()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, n in enumerate([12, 9, 7]):
        labels[row, n - 3 : n] = input_ids[row, n - 3 : n]
    return Batch(input_ids * attention_mask, attention_mask, labels, torch.tensor([1.0, 2.0, 0.5]))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    terms = completion_loss(model, batch)
    (terms.nll_sum / terms.weight_sum).backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_completion_loss_is_as_close_to_float64_as_the_composed_head(kind, monkeypatch):
    """The whole loss with the chunked head, against a float64 run of the same model: its error is no
    larger than the composed head's (the unchunked logits + F.cross_entropy)."""
    monkeypatch.setattr(minilora.head_loss, "VOCAB_CHUNK", 48)  # V = 160: four chunks, the last partial
    model = twin(hf_model(tiny_llama_config() if kind == "llama" else tiny_gemma_config()))
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    nonzero_lora_B_(model)
    model.train()
    batch = _batch(model.config.vocab_size)
    chunked, chunked_grads = _loss_and_grads(model, batch)
    monkeypatch.setattr(minilora.head_loss, "VOCAB_CHUNK", 10**9)  # one chunk: no online rescaling
    monkeypatch.setattr(minilora.loss, "head_cross_entropy",
                        lambda m, h, t: _composed(h, m.lm_head.weight, t))
    composed, composed_grads = _loss_and_grads(model, batch)
    truth, truth_grads = _loss_and_grads(model.double(), batch)

    assert torch.equal(chunked.correct_first, composed.correct_first)
    assert chunked.tokens == composed.tokens == 9
    for name, grad in truth_grads.items():
        chunked_error = (chunked_grads[name].double() - grad).abs().max()
        composed_error = (composed_grads[name].double() - grad).abs().max()
        assert chunked_error <= 4 * composed_error + 1e-9, name
        torch.testing.assert_close(chunked_grads[name].double(), grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked.nll_sum.double(), truth.nll_sum, rtol=1e-6, atol=1e-5)


def test_trained_or_soft_capped_heads_use_the_composed_form():
    model = twin(hf_model(tiny_llama_config()))
    hidden = torch.randn(4, model.config.hidden_size)
    targets = torch.tensor([1, 2, 3, 4])
    expected = F.cross_entropy(model.project(hidden), targets, reduction="none")
    model.lm_head.weight.requires_grad_(True)  # a trained head needs its weight gradient
    nll, _ = head_cross_entropy(model, hidden, targets)
    assert nll.grad_fn is not None and "ChunkedHead" not in type(nll.grad_fn).__name__
    torch.testing.assert_close(nll, expected)
    model.lm_head.weight.requires_grad_(False)
    model.config = dataclasses.replace(model.config, final_logit_softcap=5.0)
    capped = F.cross_entropy(model.project(hidden), targets, reduction="none")
    nll, _ = head_cross_entropy(model, hidden, targets)
    torch.testing.assert_close(nll, capped)
    assert not torch.allclose(capped, expected)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [16, 48, 4096])  # 160 / 48 is not whole; 4096 > V: one chunk
def test_head_log_probs_at_equal_the_full_log_softmax(chunk, softcap):
    model = twin(hf_model(tiny_gemma_config()))
    model.config = dataclasses.replace(model.config, final_logit_softcap=softcap)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, model.config.hidden_size, generator=gen) * 4  # spread logits: the cap bites
    tokens = torch.tensor([5, 159, 0, 5])  # the last vocabulary row, a repeat
    logits64 = hidden.double() @ model.lm_head.weight.double().t()  # the truth in float64
    if softcap is not None:
        logits64 = torch.tanh(logits64 / softcap) * softcap
    truth = torch.log_softmax(logits64, dim=-1)[:, tokens]
    got = head_log_probs_at(model, hidden, tokens, chunk)
    assert got.dtype == torch.float32 and got.shape == (9, 4)
    torch.testing.assert_close(got.double(), truth, rtol=0, atol=1e-5)
    if softcap is not None:  # the cap is applied, to the normaliser's logits and the picked ones alike
        uncapped = torch.log_softmax(hidden @ model.lm_head.weight.t(), dim=-1)[:, tokens]
        assert (uncapped - got).abs().max() > 0.1


def test_an_adapter_on_the_head_is_computed_by_both_head_functions():
    """lm_head is adapted only when named explicitly; its weight is then not the head's map, so the
    chunked forms must not read it (they once raised AttributeError on the wrapped head)."""
    model = twin(hf_model(tiny_llama_config()))
    inject_adapters(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    torch.manual_seed(0)
    nonzero_lora_B_(model, std=0.5)
    hidden = torch.randn(3, model.config.hidden_size)
    targets, tokens = torch.tensor([7, 8, 9]), torch.tensor([7, 8])
    logits = model.project(hidden)
    plain = hidden @ model.lm_head.base_layer.weight.t()
    assert (logits - plain).abs().max() > 0.1  # the adapter changes the head

    nll, predicted = head_cross_entropy(model, hidden, targets)
    torch.testing.assert_close(nll, F.cross_entropy(logits, targets, reduction="none"))
    assert torch.equal(predicted, logits.argmax(-1))
    nll.sum().backward()
    assert model.lm_head.lora_A.weight.grad.abs().sum() > 0  # the head's adapter is trained
    torch.testing.assert_close(head_log_probs_at(model, hidden, tokens, chunk=16),
                               torch.log_softmax(logits.detach(), dim=-1)[:, tokens])
