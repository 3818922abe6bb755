"""The LoRA linear ops with their hand-written backwards (minilora/lora_op.py) against the composed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from minilora.lora import DoRALinear, LoRALinear
from minilora.lora_op import gated_lora_linear, lora_linear
from minilora.quant import NF4Linear
from minilora.recompute import dropout_drops, zero_dropped

from .test_recompute import OpCounter


def _composed(x, weight, lora_A, lora_B, drops, p, scale):
    """LoRA as autograd ops: base + scale * B(A(dropout(x)))."""
    adapter_in = x.float()
    if drops is not None:
        adapter_in = adapter_in * zero_dropped(torch.ones(x.shape), drops) / (1 - p)
    return (F.linear(x, weight).float() + scale * F.linear(F.linear(adapter_in, lora_A), lora_B)).to(x.dtype)


def _inputs(dtype=torch.float32, dropout=0.3, shape=(2, 5, 24), out=40, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(out, shape[-1], generator=gen) * 0.2).to(dtype)
    lora_A = (torch.randn(r, shape[-1], generator=gen) * 0.2).requires_grad_()
    lora_B = (torch.randn(out, r, generator=gen) * 0.2).requires_grad_()
    torch.manual_seed(seed)
    drops = dropout_drops(torch.Size(shape), dropout, torch.device("cpu")) if dropout else None
    return x, weight, lora_A, lora_B, drops, dropout, 1.5


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradients_equal_the_composed_form(dropout, dtype):
    args = _inputs(dtype, dropout)
    x, _, lora_A, lora_B = args[:4]
    upstream = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(9)).to(dtype)
    results = []
    for function in (lambda *a: lora_linear(*a)[0], _composed):
        y = function(*args)
        grads = torch.autograd.grad((y * upstream).sum(), (x, lora_A, lora_B))
        results.append((y, *grads))
    tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for ours, reference, what in zip(results[0], results[1], ("y", "dx", "dA", "dB")):
        assert ours.dtype == reference.dtype, what
        torch.testing.assert_close(ours, reference, **tolerance, msg=what)
    assert results[0][0].dtype == dtype and results[0][2].dtype == torch.float32  # adapter grads in fp32


def test_an_input_that_wants_no_gradient_skips_both_input_gradient_products():
    x, weight, lora_A, lora_B, drops, p, scale = _inputs()
    x = x.detach()  # as the first layer's q / k / v: their input comes from the frozen embeddings
    y = lora_linear(x, weight, lora_A, lora_B, drops, p, scale)[0]
    with OpCounter() as counter:
        y.sum().backward()
    assert counter.counts.get("mm", 0) == 3, counter.counts  # dB, dh, dA: not dy @ W, not dh @ A
    assert lora_A.grad is not None and lora_B.grad is not None


def _forward_flops(function, args) -> int:
    """What torch's FLOP counter counts for one call (the ops' registered formulas)."""
    with FlopCounterMode(display=False) as counter:
        function(*args)
    return counter.get_total_flops()


def test_flop_formula_equals_the_composed_forward():
    args = _inputs(dropout=0.3)
    assert _forward_flops(lora_linear, args) == _forward_flops(_composed, args) > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_is_a_well_formed_torch_op(dropout):
    """Schema, fake-tensor shapes and the registered autograd (torch.library.opcheck)."""
    results = torch.library.opcheck(torch.ops.minilora.lora_linear.default, _inputs(dropout=dropout))
    assert set(results.values()) == {"SUCCESS"}, results


def _frozen(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)  # as inject_adapters leaves it


def test_which_layers_run_as_one_op():
    torch.manual_seed(0)
    assert LoRALinear(_frozen(8, 6), r=2, alpha=4)._runs_as_one_op()
    assert not LoRALinear(_frozen(8, 6, bias=True), r=2, alpha=4)._runs_as_one_op()  # bias: composed
    assert not LoRALinear(nn.Linear(8, 6, bias=False), r=2, alpha=4)._runs_as_one_op()  # trained base weight
    assert not DoRALinear(_frozen(8, 6), r=2, alpha=4)._runs_as_one_op()  # its own adapter_output
    nf4 = NF4Linear.from_linear(_frozen(64, 64))
    assert not LoRALinear(nf4, r=2, alpha=4)._runs_as_one_op()
    layer = LoRALinear(_frozen(8, 6), r=2, alpha=4)
    layer.disabled = True
    assert not layer._runs_as_one_op()


def test_lora_layer_with_dropout_equals_its_composed_form():
    """The same module, the op path and the composed path, with the same dropout masks."""
    torch.manual_seed(0)
    layer = LoRALinear(_frozen(24, 40), r=4, alpha=8, dropout=0.3).train()
    nn.init.normal_(layer.lora_B.weight, 0, 0.1)
    x = torch.randn(3, 7, 24, requires_grad=True)
    outputs = []
    for one_op in (True, False):
        layer._runs_as_one_op = lambda one_op=one_op: one_op
        torch.manual_seed(5)  # the same masks
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
        outputs.append((y, *grads))
    for ours, composed in zip(*outputs):
        torch.testing.assert_close(ours, composed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0][0], layer.base_layer(x) + layer.scale * layer.lora_B(layer.lora_A(x)))


def _gated_inputs(gelu: bool, dropout: float, dtype=torch.float32, intermediate=24, seed=3):
    """(gate, up, gelu, weight, lora_A, lora_B, drops, p, scale) for a down projection of width 24."""
    x, weight, lora_A, lora_B, drops, p, scale = _inputs(dtype, dropout, shape=(2, 5, intermediate), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    gate = torch.randn(x.shape, generator=gen).to(dtype).requires_grad_()
    up = torch.randn(x.shape, generator=gen).to(dtype).requires_grad_()
    return gate, up, gelu, weight, lora_A, lora_B, drops, p, scale


def _gated_composed(gate, up, gelu, *lora_args):
    """MLP.forward's own ops, then the down projection's lora_linear: autograd keeps act(gate) and the product."""
    activated = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    return lora_linear(activated * up, *lora_args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("gelu", [True, False])
def test_gated_op_equals_the_activation_then_lora_linear_bit_for_bit(gelu, dropout, dtype):
    """The recomputation in backward runs the forward's ops and autograd's backward ops in the same
    order, so values and all four gradients are identical, not just close (a bf16 base included)."""
    args = _gated_inputs(gelu, dropout, dtype)
    gate, up, _, _, lora_A, lora_B = args[:6]
    upstream = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(9)).to(dtype)
    results = []
    for function in (gated_lora_linear, _gated_composed):
        y, h = function(*args)
        grads = torch.autograd.grad((y * upstream).sum(), (gate, up, lora_A, lora_B))
        results.append((y, h, *grads))
    for ours, reference, what in zip(results[0], results[1], ("y", "h", "d gate", "d up", "dA", "dB")):
        assert ours.dtype == reference.dtype and torch.equal(ours, reference), what
    assert results[0][2].abs().sum() > 0 and results[0][3].abs().sum() > 0 and results[0][2].dtype == dtype


def test_gated_op_keeps_gate_and_up_but_not_their_product():
    """What backward keeps: the composed form saves act(gate) and act(gate) * up as well, two more
    intermediate-wide tensors per token."""
    args = _gated_inputs(gelu=True, dropout=0.3)

    def intermediate_wide_saved(function) -> int:
        kept = {}

        def pack(t):
            if t.shape == args[0].shape:  # (tokens, intermediate): not the weights
                kept[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            function(*args)
        return len(kept)

    assert intermediate_wide_saved(gated_lora_linear) == 2  # gate and up
    assert intermediate_wide_saved(_gated_composed) == 4  # gate, up, act(gate), act(gate) * up


def test_gated_op_flops_and_torch_op_checks():
    args = _gated_inputs(gelu=False, dropout=0.3)
    assert _forward_flops(gated_lora_linear, args) == _forward_flops(_gated_composed, args) > 0
    for gelu in (True, False):
        results = torch.library.opcheck(torch.ops.minilora.gated_lora_linear.default, _gated_inputs(gelu, 0.3))
        assert set(results.values()) == {"SUCCESS"}, results


def test_gated_op_zeroes_the_dropped_elements_in_its_own_product():
    """act(gate) * up is the op's own temporary, in forward and in backward, so dropout zeroes it in
    place. lora_linear, whose input other ops still read, zeroes a copy in forward and again in backward."""
    args = _gated_inputs(gelu=False, dropout=0.3)
    gate, up, _, _, lora_A, lora_B = args[:6]
    token_rows = [gate.shape[:-1].numel(), gate.shape[-1]]  # the op's (N, intermediate) layout

    def intermediate_wide_copies(function) -> int:
        with torch.profiler.profile(record_shapes=True) as prof:
            y, _ = function(*args)
            torch.autograd.grad(y.sum(), (gate, up, lora_A, lora_B))
        return sum(1 for event in prof.events()
                   if event.name == "aten::copy_" and event.input_shapes and event.input_shapes[0] == token_rows)

    assert intermediate_wide_copies(_gated_composed) == 2
    assert intermediate_wide_copies(gated_lora_linear) == 0
