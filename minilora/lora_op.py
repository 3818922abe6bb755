"""A LoRA-wrapped linear layer as one op with a hand-written backward; and the gated MLP's down projection.

    y = x @ W.T + scale * h @ B.T        h = (x * keep) @ A.T / (1 - p)

W (out, in) is frozen, A (r, in) and B (out, r) are the adapter, keep is inverted dropout's 0 / 1
flags, passed as `recompute.dropout_drops` (on CPU the dropped positions; None without dropout).
`LoRALinear` composes the same map from autograd ops: five graph nodes and a float mask, and under
selective checkpointing (recompute.py) the replay runs the two rank-r products, the mask and the add
again, because only the frozen matmul's output is kept. As one op:

* selective checkpointing keeps its outputs, y and h (r floats per token), in place of the frozen
  matmul's output: the replay recomputes nothing here;
* the dropped elements are set to 0 (in a copy of x; in place in the adapter's input gradient), and
  1 / (1 - p) is applied to the r-wide products: no float mask is made, kept or recomputed;
* backward is the four products LoRA needs and no more; the first layer's q / k / v, whose input
  (the frozen embeddings) wants no gradient, skip both input-gradient products:

      dh = scale * dy @ B      dB = scale * dy.T @ h      dA = dh.T @ (x * keep) / (1 - p)
      dx = dy @ W + (dh @ A / (1 - p)) * keep

The result equals the composed form to float rounding (tests/test_lora_op.py).

`gated_lora_linear` is the same op for the gated MLP's down projection, taking gate and up instead of
x = act(gate) * up. Composed, autograd keeps act(gate) and x for backward, two intermediate-wide
tensors per token; this op keeps gate and up only (kept anyway, as the inputs of the activation's and
the product's gradients) and recomputes x in backward: one activation and one product, each a pass
over the intermediate width. x is the op's own temporary, in forward and in backward, so dropout
zeroes its dropped elements in x itself rather than in a copy. It is how the "mlp" checkpoint policy
(recompute.py) saves memory without replaying blocks. Its values and gradients are bit-identical to
the composed form.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .recompute import keep_outputs_of, zero_dropped


@torch.library.custom_op("minilora::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, drops: Optional[Tensor],
                p: float, scale: float) -> tuple[Tensor, Tensor]:
    """(y, h): the layer's output (..., out) in x's dtype, and h (..., r) in the adapter's dtype."""
    return _forward(x, weight, lora_A, lora_B, drops, p, scale)


def _forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, drops: Tensor | None, p: float,
             scale: float, x_is_scratch: bool = False) -> tuple[Tensor, Tensor]:
    base = torch.nn.functional.linear(x, weight)  # (..., out), from x before any of it is zeroed
    h = torch.mm(_adapter_input(x, lora_A.dtype, drops, x_is_scratch), lora_A.t())  # (N, r)
    if drops is not None:
        h.mul_(1.0 / (1.0 - p))
    out_features = weight.shape[0]
    if base.dtype == lora_B.dtype:
        y = base.view(-1, out_features).addmm_(h, lora_B.t(), alpha=scale)
    else:  # e.g. a bf16 base: add in the adapter's fp32, round once
        y = base.view(-1, out_features).float().addmm_(h, lora_B.t(), alpha=scale).to(base.dtype)
    return y.view(base.shape), h.view(*x.shape[:-1], lora_A.shape[0])


def _adapter_input(x: Tensor, dtype: torch.dtype, drops: Tensor | None, x_is_scratch: bool = False) -> Tensor:
    """x * keep as (N, in) in the adapter's dtype (the 1 / (1 - p) is applied by the caller). With
    x_is_scratch (a temporary nothing reads afterwards) the dropped elements are zeroed in x itself."""
    x2 = x.reshape(-1, x.shape[-1])
    if drops is None:
        return x2.to(dtype)
    if x_is_scratch and x2.dtype == dtype and x2.is_contiguous():
        return zero_dropped(x2, drops)  # saves a copy of an intermediate-wide tensor (NOTES, round 15)
    return zero_dropped(x2.to(dtype, memory_format=torch.contiguous_format, copy=True), drops)


@lora_linear.register_fake
def _(x, weight, lora_A, lora_B, drops, p, scale):
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((*x.shape[:-1], lora_A.shape[0]), dtype=lora_A.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, drops, p, scale = inputs
    ctx.p, ctx.scale = p, scale
    ctx.save_for_backward(x, weight, lora_A, lora_B, drops, output[1])
    ctx.mark_non_differentiable(output[1])  # h is an output only so that checkpointing can keep it


def _backward(ctx, grad_y: Tensor, _grad_h: Tensor):
    x, weight, lora_A, lora_B, drops, h = ctx.saved_tensors
    need_x, _, need_A, need_B = ctx.needs_input_grad[:4]
    grad_x, grad_A, grad_B = _gradients(grad_y, x, weight, lora_A, lora_B, drops, h, ctx.p, ctx.scale,
                                        need_x, need_A, need_B)
    return grad_x, None, grad_A, grad_B, None, None, None


def _gradients(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, drops: Tensor | None,
               h: Tensor, p: float, scale: float, need_x: bool, need_A: bool, need_B: bool,
               x_is_scratch: bool = False):
    """(grad_x, grad_A, grad_B) of the layer, each None where not needed. x is read by dA only, so
    with x_is_scratch dA may zero its dropped elements in place."""
    inverse_keep = 1.0 / (1.0 - p) if drops is not None else 1.0
    dy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
    dy_adapter = dy.to(lora_B.dtype)
    grad_x = grad_A = grad_B = None
    if need_B:
        # (r, out), transposed: MKL runs this orientation 1.3-2.2x faster at these shapes (NOTES, round 14)
        grad_B = (h.reshape(-1, h.shape[-1]).t() @ dy_adapter).mul_(scale).t()  # (out, r)
    if need_A or need_x:
        dh = (dy_adapter @ lora_B).mul_(scale)  # (N, r)
        if need_A:
            grad_A = (dh.t() @ _adapter_input(x, lora_A.dtype, drops, x_is_scratch)).mul_(inverse_keep)
        if need_x:
            grad_adapter_in = dh.mul_(inverse_keep) @ lora_A  # (N, in)
            if drops is not None:
                zero_dropped(grad_adapter_in, drops)
            grad_x = dy.to(weight.dtype) @ weight
            if grad_x.dtype == grad_adapter_in.dtype:
                grad_x.add_(grad_adapter_in)
            else:
                grad_x = grad_x.float().add_(grad_adapter_in)
            grad_x = grad_x.to(x.dtype).view(x.shape)
    return grad_x, grad_A, grad_B


lora_linear.register_autograd(_backward, setup_context=_setup_context)
keep_outputs_of(torch.ops.minilora.lora_linear.default)


@register_flop_formula(torch.ops.minilora.lora_linear)
def _lora_linear_flops(x_shape, weight_shape, a_shape, *args, **kwargs) -> int:
    """The forward's three products, for torch's FLOP counter (backward runs counted aten matmuls)."""
    out_features, in_features = weight_shape
    r = a_shape[0]
    return 2 * math.prod(x_shape[:-1]) * (in_features * out_features + r * in_features + r * out_features)


@torch.library.custom_op("minilora::gated_lora_linear", mutates_args=())
def gated_lora_linear(gate: Tensor, up: Tensor, gelu: bool, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      drops: Optional[Tensor], p: float, scale: float) -> tuple[Tensor, Tensor]:
    """`lora_linear` of the gated MLP's product x = act(gate) * up (act: tanh-GELU if `gelu`, else SiLU),
    i.e. its down projection, with x recomputed in backward from gate and up instead of kept: the
    activation and the product, two intermediate-wide tensors per token, are never saved."""
    return _forward(gated_activation(gate, gelu) * up, weight, lora_A, lora_B, drops, p, scale, x_is_scratch=True)


def gated_activation(gate: Tensor, gelu: bool, in_place: bool = False) -> Tensor:
    """tanh-GELU (Gemma) or SiLU (Llama) of the gate projection: model.MLP's activation, here and there.
    in_place: overwrite gate (a tensor autograd does not track, e.g. int8.Int8GatedMLP's)."""
    if in_place:
        return torch.ops.aten.gelu_(gate, approximate="tanh") if gelu else torch.nn.functional.silu(gate, inplace=True)
    return torch.nn.functional.gelu(gate, approximate="tanh") if gelu else torch.nn.functional.silu(gate)


@gated_lora_linear.register_fake
def _(gate, up, gelu, weight, lora_A, lora_B, drops, p, scale):
    return (gate.new_empty((*gate.shape[:-1], weight.shape[0])),
            gate.new_empty((*gate.shape[:-1], lora_A.shape[0]), dtype=lora_A.dtype))


def _gated_setup_context(ctx, inputs, output):
    gate, up, gelu, weight, lora_A, lora_B, drops, p, scale = inputs
    ctx.gelu, ctx.p, ctx.scale = gelu, p, scale
    ctx.save_for_backward(gate, up, weight, lora_A, lora_B, drops, output[1])
    ctx.mark_non_differentiable(output[1])


def _gated_backward(ctx, grad_y: Tensor, _grad_h: Tensor):
    gate, up, weight, lora_A, lora_B, drops, h = ctx.saved_tensors
    need_gate, need_up, _, _, need_A, need_B = ctx.needs_input_grad[:6]
    activated = gated_activation(gate, ctx.gelu)  # the recomputation
    product = activated * up
    grad_x, grad_A, grad_B = _gradients(grad_y, product, weight, lora_A, lora_B, drops, h, ctx.p, ctx.scale,
                                        need_gate or need_up, need_A, need_B, x_is_scratch=True)
    del product
    grad_gate = grad_up = None
    if grad_x is not None:  # autograd's own backward of act(gate) * up, op for op
        if need_up:
            grad_up = grad_x * activated
        if need_gate:
            grad_activated = grad_x * up
            grad_gate = (torch.ops.aten.gelu_backward(grad_activated, gate, approximate="tanh") if ctx.gelu
                         else torch.ops.aten.silu_backward(grad_activated, gate))
    return grad_gate, grad_up, None, None, grad_A, grad_B, None, None, None


gated_lora_linear.register_autograd(_gated_backward, setup_context=_gated_setup_context)


@register_flop_formula(torch.ops.minilora.gated_lora_linear)
def _gated_lora_linear_flops(gate_shape, up_shape, gelu, weight_shape, a_shape, *args, **kwargs) -> int:
    return _lora_linear_flops(gate_shape, weight_shape, a_shape)
