"""RMSNorm as one op (minilora/norm_op.py) against the composed form it replaces."""

from __future__ import annotations

import pytest
import torch

from minilora.norm_op import rms_norm_op


def _composed(x, weight, eps, unit_offset):
    x_float = x.float()
    x_hat = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (x_hat * (1.0 + weight.float())).to(x.dtype)
    return weight * x_hat.to(x.dtype)


@pytest.mark.parametrize("unit_offset", [True, False])  # Gemma, Llama
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_the_composed_form(unit_offset, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 48, generator=gen) * 3).to(dtype).requires_grad_()
    weight = (torch.randn(48, generator=gen) * 0.3).to(dtype).requires_grad_()
    upstream = torch.randn(3, 5, 48, generator=gen).to(dtype)
    results = []
    for function in (lambda *a: rms_norm_op(*a)[0], _composed):
        y = function(x, weight, 1e-6, unit_offset)
        results.append((y, *torch.autograd.grad((y * upstream).sum(), (x, weight))))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for ours, reference, what in zip(results[0], results[1], ("y", "dx", "dw")):
        assert ours.dtype == reference.dtype == dtype, what
        torch.testing.assert_close(ours, reference, **tolerance, msg=what)


def test_a_frozen_weight_gets_no_gradient_and_costs_none():
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.zeros(16)  # frozen, as every norm under LoRA
    y, r = rms_norm_op(x, weight, 1e-6, True)
    assert not r.requires_grad  # kept for backward only
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == x.shape and weight.grad is None


@pytest.mark.parametrize("unit_offset", [True, False])
def test_is_a_well_formed_torch_op(unit_offset):
    """Schema, fake-tensor shapes and the registered autograd (torch.library.opcheck)."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    results = torch.library.opcheck(torch.ops.minilora.rms_norm.default, (x, weight, 1e-6, unit_offset))
    assert set(results.values()) == {"SUCCESS"}, results
