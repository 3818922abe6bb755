"""RoPE + the (B, heads, T, hd) layout as ops (minilora/heads_op.py) against the composed autograd form."""

from __future__ import annotations

import pytest
import torch

from minilora.config import RopeConfig
from minilora.heads_op import from_heads, to_heads
from minilora.model import rope_cos_sin, rope_inverse_frequencies

BATCH, LENGTH, HEADS, HEAD_DIM = 3, 5, 2, 8


def _composed_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _composed_to_heads(x, cos, sin, index):
    rows = _composed_rope(x, cos, sin) if cos is not None else x
    grid = rows if index is None else x.new_zeros(BATCH * LENGTH, *x.shape[1:]).index_copy(0, index, rows)
    return grid.view(BATCH, LENGTH, *x.shape[1:]).transpose(1, 2)


def _layout(padded: bool):
    """Real tokens of a right-padded batch (rows of 5, 2 and 4 tokens) or the whole grid."""
    valid = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]], dtype=torch.bool)
    if not padded:
        valid[:] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    index = valid.reshape(-1).nonzero().squeeze(1)
    inv_freq = rope_inverse_frequencies(RopeConfig(theta=10_000.0), HEAD_DIM)
    cos, sin = rope_cos_sin(inv_freq, positions.reshape(-1)[index], torch.float32)  # (N, 1, hd)
    return (index if padded else None), cos, sin


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("rope", [True, False])  # q / k, and v
def test_to_heads_equals_the_composed_form_bit_for_bit(padded, rope):
    index, cos, sin = _layout(padded)
    if not rope:
        cos = sin = None
    gen = torch.Generator().manual_seed(0)
    tokens = BATCH * LENGTH if index is None else len(index)
    x = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen, requires_grad=True)
    upstream = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, generator=gen)
    ours = to_heads(x, cos, sin, index, BATCH, LENGTH)
    reference = _composed_to_heads(x, cos, sin, index)
    assert ours.shape == reference.shape == (BATCH, HEADS, LENGTH, HEAD_DIM)
    assert torch.equal(ours, reference)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    (grad_reference,) = torch.autograd.grad((reference * upstream).sum(), x)
    assert torch.equal(grad_ours, grad_reference)
    if index is not None:  # padding positions are zeros
        assert ours.transpose(1, 2).reshape(BATCH * LENGTH, -1)[[7, 8, 9, 14]].abs().sum() == 0


def test_rope_preserves_norms_and_moves_values():
    """A rotation: each (i, i + hd/2) pair keeps its length, and position > 0 changes the values."""
    index, cos, sin = _layout(True)
    x = torch.randn(len(index), HEADS, HEAD_DIM)
    rows = to_heads(x, cos, sin, index, BATCH, LENGTH).transpose(1, 2).reshape(BATCH * LENGTH, HEADS, HEAD_DIM)[index]
    half = HEAD_DIM // 2
    pair_norm = lambda t: t[..., :half] ** 2 + t[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(rows), pair_norm(x))
    assert torch.equal(rows[0], x[0])  # position 0: no rotation
    assert not torch.allclose(rows[1], x[1])


def test_from_heads_gathers_the_real_tokens_and_scatters_their_gradient():
    index, _, _ = _layout(True)
    out = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, requires_grad=True)
    rows = from_heads(out, index)
    expected = out.transpose(1, 2).reshape(BATCH * LENGTH, HEADS * HEAD_DIM)[index]
    assert torch.equal(rows, expected)
    upstream = torch.randn_like(rows)
    (grad,) = torch.autograd.grad((rows * upstream).sum(), out)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), out)
    assert torch.equal(grad, grad_expected)


def test_to_heads_output_does_not_alias_its_input():
    x = torch.randn(BATCH * LENGTH, HEADS, HEAD_DIM)
    out = to_heads(x, None, None, None, BATCH, LENGTH)
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.equal(out.transpose(1, 2).reshape(x.shape), x)


@pytest.mark.parametrize("padded", [True, False])
def test_are_well_formed_torch_ops(padded):
    """Schema, fake-tensor shapes and strides, and the registered autograd (torch.library.opcheck)."""
    index, cos, sin = _layout(padded)
    tokens = BATCH * LENGTH if index is None else len(index)
    x = torch.randn(tokens, HEADS, HEAD_DIM, requires_grad=True)
    for args in ((x, cos, sin, index, BATCH, LENGTH), (x, None, None, index, BATCH, LENGTH)):
        results = torch.library.opcheck(torch.ops.minilora.to_heads.default, args)
        assert set(results.values()) == {"SUCCESS"}, results
    if index is not None:
        out = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, requires_grad=True)
        results = torch.library.opcheck(torch.ops.minilora.from_heads.default, (out, index))
        assert set(results.values()) == {"SUCCESS"}, results
