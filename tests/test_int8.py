"""Int8 inference (minilora/int8.py): the quantizers and the int8 product against exact integer / float64
arithmetic, SmoothQuant against its formula and its purpose (an outlier channel), and the whole model
under `int8_for_inference` against the fp32 model: close, not equal, and back to fp32 bit for bit."""

import copy
import importlib

import pytest
import torch
from torch import nn

from minilora.checkpoint import load_model
from minilora.evaluate import INT8_CALIBRATION_ROWS, predict
from minilora.head_loss import head_log_probs_at
from minilora.int8 import (Int8GatedMLP, Int8Head, Int8Linear, SharedInput, decoder_projections, int8_for_inference,
                           int8_product, quantize_rows, smoothing_factors)
from minilora.model import MLP
from minilora.lora import LoraConfig, disable_adapters, inject_adapters
from minilora.prompts import PromptFormatter
from minilora.quant import quantize_nf4
from minilora.scoring import label_logprobs
from minilora.tokenizer import Tokenizer
from tests.tiny import hf_model, nonzero_lora_B_, save_tiny_checkpoint, tiny_gemma_config, tiny_llama_config

TEXTS = [f"w{i} w{i + 3} w{i + 7} w{i + 11} ." for i in range(12)]
CLOSE = 0.15  # largest |int8 - fp32| log-probability of the tiny random models (~1 % of their size); seen: 0.097


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    x = torch.randn(5, 33) * torch.tensor([[0.01], [1.0], [30.0], [1.0], [1.0]])
    x[3] = 0.0  # an all-zero row: codes 0, no NaN
    codes, scales = quantize_rows(x)
    assert codes.dtype == torch.int8 and scales.shape == (5, 1)
    assert codes.abs().max() == 127 and codes[3].abs().max() == 0
    torch.testing.assert_close(scales[:3, 0], x[:3].abs().amax(1) / 127)
    assert ((codes.float() * scales - x).abs() <= scales / 2 + 1e-7).all()  # round to nearest
    assert torch.isfinite(scales).all()


def test_int8_product_is_the_exact_integer_product():
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 16, 17, 40):  # CUDA's kernel needs > 16 rows; the CPU one takes any
        a = torch.randint(-127, 128, (rows, 24), dtype=torch.int8, generator=gen)
        b = torch.randint(-127, 128, (40, 24), dtype=torch.int8, generator=gen)
        out = int8_product(a, b.t())
        assert out.dtype == torch.int32
        assert torch.equal(out.long(), a.long() @ b.long().t())


def test_int8_linear_computes_from_its_codes_and_approximates_the_float_product():
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(48, 20)
    x = torch.randn(3, 7, 48, generator=gen)
    q = Int8Linear(layer.weight, layer.bias, SharedInput(None))
    out = q(x)
    assert out.shape == (3, 7, 20)
    codes, row_scales = quantize_rows(x.reshape(-1, 48))
    expected = (codes.double() @ q.weight_codes.double().t()) * row_scales.double() * q.weight_scales.double()
    expected += layer.bias.double()
    torch.testing.assert_close(out.reshape(-1, 20).double(), expected, atol=1e-5, rtol=1e-6)
    reference = layer(x).detach()
    error = (out - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.02


def test_smoothing_factors_follow_the_smoothquant_formula():
    activations = torch.tensor([4.0, 0.5, 100.0])
    weight = torch.tensor([[1.0, -2.0, 0.25], [-0.5, 1.0, 0.5]])
    s = smoothing_factors(activations, weight, 0.75)
    expected = activations**0.75 / torch.tensor([1.0, 2.0, 0.5]) ** 0.25
    torch.testing.assert_close(s, expected)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(activations, weight, 1.5)


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    """One input channel 50x the others, as LLM activations have: without smoothing the per-token
    scale leaves the other channels a few levels; with it the product's error is about halved."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 96, generator=gen)
    x[:, 5] *= 50
    layer = nn.Linear(96, 32, bias=False)
    reference = layer(x).detach()
    s = smoothing_factors(x.abs().amax(0), layer.weight.detach(), 0.8)
    plain = Int8Linear(layer.weight, None, SharedInput(None))(x)
    smoothed = Int8Linear(layer.weight, None, SharedInput(1.0 / s), s)(x)
    assert (smoothed - reference).abs().mean() * 1.5 < (plain - reference).abs().mean()


def test_a_shared_input_is_quantized_once_per_tensor():
    shared = SharedInput(None)
    x = torch.randn(4, 8)
    first = shared.quantize(x)
    assert shared.quantize(x) is first
    y = x.clone()  # equal values, another tensor (e.g. the next batch's in the same memory)
    assert shared.quantize(y) is not first


@pytest.mark.parametrize("gelu", [True, False])
def test_the_fused_gated_mlp_equals_its_three_projections(gelu):
    """Int8GatedMLP leaves out two per-token scalings; the result differs from the three Int8Linears
    only by the rounding that moves with them."""
    gen = torch.Generator().manual_seed(3)
    gate, up, down = nn.Linear(32, 80, bias=False), nn.Linear(32, 80, bias=False), nn.Linear(80, 32, bias=False)
    x = torch.randn(50, 32, generator=gen)
    product = torch.nn.functional.gelu(gate(x), approximate="tanh") if gelu else torch.nn.functional.silu(gate(x))
    reference = down(product * up(x)).detach()
    s_in = smoothing_factors(x.abs().amax(0), torch.cat((gate.weight, up.weight)).detach(), 0.5)
    s_mid = smoothing_factors((product * up(x)).abs().amax(0).detach(), down.weight.detach(), 0.5)
    shared = SharedInput(1.0 / s_in)
    parts = (Int8Linear(gate.weight, None, shared, s_in), Int8Linear(up.weight, None, shared, s_in),
             Int8Linear(down.weight, None, SharedInput(1.0 / s_mid), s_mid))
    act = torch.nn.functional.gelu if gelu else torch.nn.functional.silu
    kwargs = {"approximate": "tanh"} if gelu else {}
    one_by_one = parts[2](act(parts[0](x), **kwargs) * parts[1](x))
    fused = Int8GatedMLP(*parts, gelu=gelu)(x)
    size = reference.abs().max()
    assert (fused - one_by_one).abs().max() < 0.01 * size
    assert 0 < (fused - reference).abs().max() < 0.03 * size


def test_the_int8_head_normalises_like_the_fp32_head_and_reads_exact_logits():
    gen = torch.Generator().manual_seed(4)
    head = nn.Linear(48, 5000, bias=False)
    hidden = torch.randn(7, 48, generator=gen) * 3
    logits = head(hidden).detach()
    for cap in (None, 30.0):
        int8_head = Int8Head(head, cap)
        capped = logits if cap is None else torch.tanh(logits / cap) * cap
        assert int8_head.weight is head.weight
        assert torch.equal(int8_head(hidden), logits)
        difference = (int8_head.log_sum_exp(hidden) - torch.logsumexp(capped, dim=1)).abs().max()
        assert 0 < difference < 0.02


def test_under_the_int8_head_the_label_logits_are_exact(tiny):
    """The normaliser is shared by all labels of a row, so the int8 head never changes the argmax."""
    model, _ = tiny
    hidden = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    tokens = torch.tensor([5, 6, 8])
    fp32 = head_log_probs_at(model, hidden, tokens)
    original = model.lm_head
    model.lm_head = Int8Head(original, model.config.final_logit_softcap)
    try:
        int8 = head_log_probs_at(model, hidden, tokens)
    finally:
        model.lm_head = original
    shift = int8 - fp32  # one normaliser per row: the same shift for every label
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5, rtol=0)
    assert 0 < shift.abs().max() < 0.05


# ----------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    config = tiny_llama_config() if request.param == "llama" else tiny_gemma_config(sliding_window=16)
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), hf_model(config))
    tokenizer = Tokenizer(folder)
    formatter = PromptFormatter(tokenizer)
    formatter.label_ids = {"positive": [5], "neutral": [6, 7], "negative": [8]}
    return load_model(folder).model, formatter


def _scores_in_int8(model, formatter, texts=TEXTS, **kwargs):
    with int8_for_inference(model, lambda: label_logprobs(model, formatter, texts[:4]), **kwargs) as quantized:
        return label_logprobs(quantized, formatter, texts, batch_size=3)


def test_int8_scores_are_close_to_fp32_and_the_model_comes_back_unchanged(tiny):
    model, formatter = tiny
    modules = dict(model.named_modules())
    fp32 = label_logprobs(model, formatter, TEXTS, batch_size=3)
    int8 = _scores_in_int8(model, formatter)
    difference = (int8 - fp32).abs().max()
    assert 0 < difference < CLOSE  # really int8, and close
    assert dict(model.named_modules()) == modules  # the same module objects are back
    assert torch.equal(label_logprobs(model, formatter, TEXTS, batch_size=3), fp32)


def test_projections_that_read_one_tensor_share_its_quantization(tiny):
    model, formatter = tiny
    head_weight = model.lm_head.weight
    with int8_for_inference(model, lambda: label_logprobs(model, formatter, TEXTS[:4])):
        for index, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            assert all(isinstance(p, Int8Linear) for p in (attention.q_proj, attention.o_proj, mlp.down_proj))
            assert attention.k_proj.shared is attention.v_proj.shared
            assert mlp.gate_proj.shared is mlp.up_proj.shared
            assert mlp.gate_proj.shared is not mlp.down_proj.shared
            assert attention.o_proj.shared is not attention.k_proj.shared
            if index < len(model.model.layers) - 1:  # the last layer's queries read only the scored rows
                assert attention.q_proj.shared is attention.k_proj.shared
            assert isinstance(layer.mlp, Int8GatedMLP)
        assert isinstance(model.lm_head, Int8Head) and model.lm_head.weight is head_weight  # no copy
    assert type(model.lm_head) is nn.Linear and all(type(layer.mlp) is MLP for layer in model.model.layers)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_int8_runs_the_adapters_as_they_are_set(tiny, base):
    """Unmerged adapters (on dense or NF4 bases) go into the int8 weights; disabled ones do not."""
    model = copy.deepcopy(tiny[0])
    formatter = tiny[1]
    if base == "nf4":
        quantize_nf4(model)
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    nonzero_lora_B_(model, std=0.5)
    adapted = label_logprobs(model, formatter, TEXTS, batch_size=3)
    with disable_adapters(model):
        plain = label_logprobs(model, formatter, TEXTS, batch_size=3)
        plain_int8 = _scores_in_int8(model, formatter)
    adapted_int8 = _scores_in_int8(model, formatter)
    effect = (adapted - plain).abs().max()
    assert effect > 0.5  # the adapters matter ...
    # ... and int8 keeps them (seen: at most 1/6 of the effect, on tiny Gemma's large random updates)
    assert (adapted_int8 - adapted).abs().max() < effect / 4
    assert (plain_int8 - plain).abs().max() < CLOSE


def test_every_decoder_projection_is_found_once(tiny):
    model = copy.deepcopy(tiny[0])
    inject_adapters(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    names = [name for name, _ in decoder_projections(model)]
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(names) == len(set(names)) == per_layer * len(model.model.layers)
    assert not any("lora_" in name or "base_layer" in name for name in names)


def test_predict_in_int8_keeps_the_calibration_rows_exact(tiny, monkeypatch):
    monkeypatch.setattr(importlib.import_module("minilora.evaluate"), "INT8_CALIBRATION_ROWS", 4)
    model, formatter = tiny
    fp32 = predict(model, formatter, TEXTS, "score", batch_size=3)
    int8 = predict(model, formatter, TEXTS, "score", batch_size=3, int8=True)
    torch.testing.assert_close(int8.logprobs[:4], fp32.logprobs[:4], atol=1e-6, rtol=0)
    assert 0 < (int8.logprobs[4:] - fp32.logprobs[4:]).abs().max() < CLOSE
    one_row = predict(model, formatter, TEXTS[:1], "score", int8=True)  # nothing left to run in int8
    torch.testing.assert_close(one_row.logprobs, fp32.logprobs[:1], atol=1e-6, rtol=0)
    generated = predict(model, formatter, TEXTS, "generate", batch_size=3, max_new_tokens=2, int8=True)
    assert len(generated.predicted) == len(TEXTS)


def test_default_calibration_is_a_few_dozen_rows():
    assert 16 <= INT8_CALIBRATION_ROWS <= 128
