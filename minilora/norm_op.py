"""RMSNorm as one op with a hand-written backward.

    r = 1 / sqrt(mean(x^2) + eps)        per row, fp32
    y = x * r * (1 + w)                  Gemma (unit offset; the product before the cast back)
    y = w * cast(x * r)                  Llama

Composed from autograd ops, a norm is about eight ops forward and as many backward, each a pass over
the activation with its own graph node, and under checkpointing each forward op is dispatched again
in the replay. Gemma 3 runs six norms per layer. As one op the forward is four passes, in the
reference implementations' order (so its outputs are bit-identical to theirs), and backward,
from x and the (N, 1) r it keeps, is

    g' = g * (1 + w)  (or g * w)
    dx = r * g' - x * r^3 * mean(g' * x)
    dw = sum over rows of g * x * r      (only when w is trained)

Same values as the composed form to fp32 rounding (tests/test_norm_op.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("minilora::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float, unit_offset: bool) -> tuple[Tensor, Tensor]:
    """(y in x's dtype, r (..., 1) in fp32); r is an output only so that backward can keep it."""
    x_float = x.float()
    r = _inverse_rms(x_float, eps)
    if unit_offset:
        return torch.mul(x_float, r).mul_(1.0 + weight.float()).to(x.dtype), r
    return weight * torch.mul(x_float, r).to(x.dtype), r


def _inverse_rms(x_float: Tensor, eps: float) -> Tensor:
    # the reference implementations' own op order (pow, mean, add, rsqrt): bit-identical outputs
    return torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)


@rms_norm_op.register_fake
def _(x, weight, eps, unit_offset):
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, eps, unit_offset = inputs
    ctx.unit_offset = unit_offset
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y: Tensor, _grad_r: Tensor):
    x, weight, r = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[:2]
    x_float, grad_float = x.float(), grad_y.float()
    scale = 1.0 + weight.float() if ctx.unit_offset else weight.float()
    grad_x = grad_weight = None
    if need_weight:
        grad_weight = (grad_float * x_float * r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    if need_x:
        scaled = grad_float * scale  # (..., H)
        per_row = torch.linalg.vecdot(scaled, x_float, dim=-1).unsqueeze(-1).mul_(r.pow(3) / x.shape[-1])
        grad_x = scaled.mul_(r).addcmul_(x_float, per_row, value=-1.0).to(x.dtype)
    return grad_x, grad_weight, None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
