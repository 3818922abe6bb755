"""GELU with the tanh approximation (Gemma's MLP activation), fast on CPUs.

    gelu(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u)        u = sqrt(2 / pi) (x + 0.044715 x^3)

PyTorch's CPU kernels for tanh-GELU and its backward run at ~1.8 ns per element here, about four
times its sigmoid, because of an accurate tanh. The sigmoid form above is the same function
(1 + tanh(u) = 2 sigmoid(2u)); as an op with its own backward,

    d gelu / dx = s + x s (1 - s) 2 sqrt(2 / pi) (1 + 3 * 0.044715 x^2)        s = sigmoid(2u)

it takes 1.2 ms instead of 2.6 forward and 2.3 instead of 2.6 backward on Gemma 3 270M's (704, 2048)
MLP activations, and checkpointing replays the forward. Within 1e-6 of F.gelu(approximate="tanh")
(tests/test_gelu_op.py). Off the CPU F.gelu is one fused kernel, and it is used as it is, as for bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_C = math.sqrt(2.0 / math.pi)
_K = 0.044715


def gelu_tanh(x: Tensor) -> Tensor:
    """F.gelu(x, approximate="tanh"), through `gelu_tanh_op` for fp32 / fp64 on CPU."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return gelu_tanh_op(x)
    return F.gelu(x, approximate="tanh")  # one fused kernel on GPUs; bf16 is computed in fp32 inside it


@torch.library.custom_op("minilora::gelu_tanh", mutates_args=())
def gelu_tanh_op(x: Tensor) -> Tensor:
    return _sigmoid_2u(x).mul_(x)


def _sigmoid_2u(x: Tensor) -> Tensor:
    """sigmoid(2 sqrt(2 / pi) (x + 0.044715 x^3)), in place on one new tensor."""
    return (x * x).mul_(2 * _C * _K).add_(2 * _C).mul_(x).sigmoid_()


@gelu_tanh_op.register_fake
def _(x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    s = _sigmoid_2u(x)
    slope = (x * x).mul_(3 * 2 * _C * _K).add_(2 * _C).mul_(x)  # x 2c (1 + 3k x^2)
    return slope.mul_(1.0 - s).add_(1.0).mul_(s).mul_(grad)  # s (1 + x 2c (1 + 3k x^2) (1 - s))


gelu_tanh_op.register_autograd(_backward, setup_context=_setup_context)
