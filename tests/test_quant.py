"""NF4Linear against bitsandbytes' own dequantize, and QLoRA (NF4 base + LoRA) training on CPU."""

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from minilora.lora import LoraConfig, adapter_parameters, adapter_state_dict, inject_adapters, merge_adapters
from minilora.quant import NF4Linear, dequantize_nf4, quantize_module_nf4, quantize_nf4
from tests.tiny import hf_model, nonzero_lora_B_, tiny_gemma_config, tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 17], [3, 4, 99, 12, 127, 8, 0, 64]])  # (B, T)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_matches_bitsandbytes_dequantize(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True)
    nf4 = NF4Linear.from_linear(linear, double_quant=double_quant)
    assert nf4.quant_state.blocksize == 64 and nf4.quant_state.nested == double_quant

    # the reference: bitsandbytes quantizes the same weight, dequantizes, plain matmul
    packed, state = bnbF.quantize_4bit(
        linear.weight.detach(), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    weight = bnbF.dequantize_4bit(packed, state)  # (96, 128)
    assert torch.equal(nf4.dequantize(), weight)
    assert 0 < (weight - linear.weight).abs().max() < 0.1  # really 4-bit, still close

    for shape in [(2, 7, 128), (1, 128)]:  # a batch, and the single-row (gemv) path
        x = torch.randn(shape)
        torch.testing.assert_close(nf4(x), x @ weight.T + linear.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nf4.to_linear()(x), nf4(x), atol=1e-5, rtol=1e-5)


def test_nf4_compute_dtype_and_state_dict():
    nf4 = NF4Linear.from_weight(torch.randn(32, 64), compute_dtype=torch.bfloat16)
    assert nf4.dequantize().dtype == torch.bfloat16
    assert nf4(torch.randn(3, 64)).dtype == torch.float32  # output follows the input dtype
    assert nf4.state_dict() == {}  # packed codes never leak into a state dict
    nf4.to(torch.float16)  # a dtype cast leaves the uint8 codes alone
    assert nf4.weight_nf4.dtype == torch.uint8

    # ... and the bias back in the compute dtype, so that a layer with a bias still runs after model.to(...)
    # (as bitsandbytes' Linear4bit; this bias is exact in bf16, so its round trip loses nothing)
    bias = torch.randn(32).bfloat16().float()
    biased = NF4Linear.from_weight(torch.randn(32, 64), bias, compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    expected = biased(x)
    biased.to(torch.bfloat16)
    assert biased.bias.dtype == torch.float32
    torch.testing.assert_close(biased(x), expected, rtol=0, atol=0)

    # quantization runs where the weight is put: `device` moves it first; .to() carries the quant state along
    nf4 = NF4Linear.from_weight(torch.randn(32, 64), double_quant=True, device="cpu").to("cpu")
    assert nf4.weight_nf4.device == nf4.quant_state.absmax.device == nf4.quant_state.state2.absmax.device


def test_quantize_nf4_replaces_only_projections():
    model = hf_model(tiny_gemma_config(tie_word_embeddings=False))
    names = quantize_nf4(model)
    assert len(names) == 7 * 6 and all(n.endswith("_proj") for n in names)
    assert not any(m.training for m in model.modules())  # replacements keep the model's eval mode
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is not NF4Linear
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]

    # one decoder layer at a time, as a streaming loader does
    model = hf_model(tiny_llama_config(num_hidden_layers=2))
    assert quantize_module_nf4(model.model.layers[0]) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear


def test_qlora_trains_on_cpu_and_merge_needs_dequantize():
    torch.manual_seed(0)
    model = hf_model(tiny_llama_config(num_hidden_layers=2))
    quantize_nf4(model, double_quant=True)
    inject_adapters(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    model.train()
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert set(adapter_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}

    model.eval()
    with torch.no_grad():
        adapted = model(IDS).logits
    with pytest.raises(TypeError, match="NF4-quantized. Call minilora.quant.dequantize_nf4"):
        merge_adapters(model)
    assert len(dequantize_nf4(model)) == 14  # the adapters' base layers become nn.Linear
    merge_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, adapted, atol=1e-4, rtol=0)


def test_nf4_linear_forward_and_backward_match_bitsandbytes_matmul_4bit():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(nn.Linear(128, 96, bias=True))
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ours = nf4(x)
    ref = bnb.matmul_4bit(x_ref, nf4.weight_nf4.t(), quant_state=nf4.quant_state, bias=nf4.bias)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def _qlora_minilora_model():
    from minilora.model import CausalLM
    from tests.tiny import twin

    model: CausalLM = twin(hf_model(tiny_llama_config(num_hidden_layers=2)))
    quantize_nf4(model)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    nonzero_lora_B_(model)
    return model.train()


@pytest.mark.parametrize("policy", ["none", "full", "selective", "mlp"])
def test_dequantizations_per_step(monkeypatch, policy):
    """Each NF4 weight is dequantized once per forward and kept for its backward (bitsandbytes'
    matmul_4bit: again in backward), once more in a checkpoint replay (for "mlp", the MLP's weights
    only), and once per optimizer step inside `dequantize_once` -- with gradients identical in every case."""
    from minilora.prompts import Batch
    from minilora.trainer import accumulate_gradients

    model = _qlora_minilora_model()
    model.gradient_checkpointing = policy != "none"
    model.checkpoint_policy = "full" if policy == "none" else policy
    n_weights = sum(isinstance(m, NF4Linear) for m in model.modules())
    assert n_weights == 14
    n_mlp_weights = sum(isinstance(m, NF4Linear) for name, m in model.named_modules() if ".mlp." in name)
    assert n_mlp_weights == 6  # "mlp" replays only the feed-forward half
    calls = []
    real = bnbF.dequantize_4bit
    monkeypatch.setattr(bnbF, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    labels = IDS.clone()
    labels[:, :5] = -100
    micro_batches = [Batch(IDS, torch.ones_like(IDS), labels, torch.ones(2)) for _ in range(2)]

    grads = {}
    for once in (False, True):
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(5)  # same dropout masks in both runs
        accumulate_gradients(model, micro_batches, torch.device("cpu"), dequantize_once=once)
        replayed = {"none": 0, "full": n_weights, "selective": n_weights, "mlp": n_mlp_weights}[policy]
        assert len(calls) == (n_weights if once else 2 * (n_weights + replayed))  # 2 micro-batches
        grads[once] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(m._dequantized is None for m in model.modules() if isinstance(m, NF4Linear))  # freed
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-7)
