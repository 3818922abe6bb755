"""RoPE and the move between token rows and attention's (B, heads, T, hd) layout, as two ops with
hand-written backwards.

The decoder runs projections on token rows (N real tokens, `positions.Unpadded`), and attention on a
padded (B, heads, T, hd) batch. Composed from autograd ops, getting q or k there is RoPE (two slices,
neg, cat, two muls, add), a zero-filled copy, a scatter and a transpose: about ten ops and as many
graph nodes per tensor, each a pass over the activation, and under selective checkpointing each
forward op is dispatched again in the replay. As one op it is one product, two in-place half-width
updates and one scatter into a zeroed buffer; backward is a gather and the inverse rotation.

    forward   y = x * cos + rotate_half(x) * sin,    rotate_half(x) = (-x2, x1)
    backward  dx = g * cos + (g2 * sin2, -g1 * sin1)

Same values as the composed form, bit for bit: each element is the same products added in the same
order (tests/test_heads_op.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("minilora::to_heads", mutates_args=())
def to_heads(x: Tensor, cos: Tensor | None, sin: Tensor | None, index: Tensor | None, batch: int,
             length: int) -> Tensor:
    """x (N, heads, hd) token rows -> (batch, heads, length, hd), RoPE applied when cos / sin (N, 1, hd)
    are given. index (N,): each row's flat position in the (batch * length) grid, zeros elsewhere;
    None when the rows are already that grid (N = batch * length). The result is a transposed view of
    a contiguous (batch, length, heads, hd) buffer, the layout attention's kernels take."""
    rows = _rotate(x, cos, sin, inverse=False) if cos is not None else x
    if index is None:
        grid = rows.contiguous() if rows is not x else x.clone()  # an op's output may not alias its input
    else:
        grid = x.new_zeros(batch * length, *x.shape[1:]).index_copy_(0, index, rows)
    return grid.view(batch, length, *x.shape[1:]).transpose(1, 2)


@to_heads.register_fake
def _(x, cos, sin, index, batch, length):
    return x.new_empty(batch, length, *x.shape[1:]).transpose(1, 2)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """x * cos + rotate_half(x) * sin (inverse: the transpose, x * cos - rotate_half(x) * sin)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    out = x * cos
    if inverse:
        out[..., :half] += second * sin[..., half:]
        out[..., half:] -= first * sin[..., :half]
    else:  # -(x2 * s) is exactly (-x2) * s, so this is the composed form's arithmetic
        out[..., :half] -= second * sin[..., :half]
        out[..., half:] += first * sin[..., half:]
    return out


def _to_heads_setup(ctx, inputs, output):
    x, cos, sin, index, batch, length = inputs
    ctx.save_for_backward(cos, sin, index)
    ctx.rows = x.shape


def _to_heads_backward(ctx, grad: Tensor):
    cos, sin, index = ctx.saved_tensors
    rows = grad.transpose(1, 2).reshape(-1, *ctx.rows[1:])  # (batch * length, heads, hd)
    if index is not None:
        rows = rows.index_select(0, index)
    if cos is not None:
        rows = _rotate(rows, cos, sin, inverse=True)
    return rows.reshape(ctx.rows), None, None, None, None, None


to_heads.register_autograd(_to_heads_backward, setup_context=_to_heads_setup)


@torch.library.custom_op("minilora::from_heads", mutates_args=())
def from_heads(out: Tensor, index: Tensor) -> Tensor:
    """Attention's (batch, heads, length, hd) output -> token rows (N, heads * hd): the rows at `index`
    of the flat (batch * length) grid (the inverse of `to_heads` at those rows)."""
    return out.transpose(1, 2).reshape(-1, out.shape[1] * out.shape[3]).index_select(0, index)


@from_heads.register_fake
def _(out, index):
    return out.new_empty(index.shape[0], out.shape[1] * out.shape[3])


def _from_heads_setup(ctx, inputs, output):
    out, index = inputs
    ctx.save_for_backward(index)
    ctx.grid = out.shape


def _from_heads_backward(ctx, grad: Tensor):
    (index,) = ctx.saved_tensors
    batch, heads, length, head_dim = ctx.grid
    grid = grad.new_zeros(batch * length, heads * head_dim).index_copy_(0, index, grad)
    return grid.view(batch, length, heads, head_dim).transpose(1, 2), None


from_heads.register_autograd(_from_heads_backward, setup_context=_from_heads_setup)
