"""tanh-GELU in its sigmoid form (minilora/gelu_op.py) against torch's F.gelu(approximate="tanh")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minilora.gelu_op import gelu_tanh, gelu_tanh_op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradient_equal_torch(dtype):
    x = torch.cat((torch.linspace(-12, 12, 2001), torch.randn(3000, generator=torch.Generator().manual_seed(0)) * 3))
    x = x.to(dtype).requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours = gelu_tanh_op(x)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), x)
    reference = F.gelu(x, approximate="tanh")
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), x)
    tolerance = dict(rtol=2e-6, atol=5e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, reference, **tolerance)
    torch.testing.assert_close(grad, reference_grad, **tolerance)
    assert torch.isfinite(grad).all()  # no overflow in the tails


def test_other_dtypes_use_torch_directly():
    x = torch.randn(64).bfloat16()
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))


def test_is_a_well_formed_torch_op():
    x = torch.randn(3, 7, requires_grad=True)
    results = torch.library.opcheck(torch.ops.minilora.gelu_tanh.default, (x,))
    assert set(results.values()) == {"SUCCESS"}, results
