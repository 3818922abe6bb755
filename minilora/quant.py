"""NF4 weight quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) with bitsandbytes.

`NF4Linear` stores a frozen (out, in) weight as 4-bit NormalFloat codes in blocks of 64 with one
absmax per block; with double quantization (`double_quant`, bitsandbytes' `compress_statistics`) the
absmax values are themselves 8-bit quantized in blocks of 256. The compute dtype is a parameter,
fp32 by default.

Dequantizing is the cost of QLoRA (bitsandbytes dequantizes for every matmul on CPU, and for every
training-shaped matmul on CUDA), so `NF4Linear` controls how often it happens:

* the forward dequantizes once and keeps that weight for its own backward (`_NF4Matmul`; bitsandbytes'
  `matmul_4bit` dequantizes a second time in backward). With gradient checkpointing the weight is
  dropped after the forward and dequantized again in the replay, so a block's weights live only
  while that block runs: 2 dequantizations per micro-batch instead of 3;
* inside `dequantize_once(model)` each weight is dequantized on first use and reused until the
  context ends: the trainer wraps a whole optimizer step (all micro-batches, replays, backward), so it
  is 1 per step, at the cost of holding the dequantized block weights for the step.

The packed codes are a non-persistent buffer: they never appear in `state_dict()`, so they cannot leak
into adapter files, and a checkpoint is only ever written dequantized (`adapter_io.export_merged`).

Quantizing happens on the weight's device: pass `device="cuda"` to move each layer there first
(fast, and the bf16 original never sits on the GPU as a whole). `quantize_module_nf4` works on one
subtree, so a loader can quantize decoder layer by decoder layer and keep peak memory near the
quantized size plus one layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import bitsandbytes.functional as bnbF


BLOCKSIZE = 64  # weights per absmax, as in the QLoRA paper


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as bitsandbytes NF4."""

    def __init__(
        self, weight_nf4: Tensor, quant_state: bnbF.QuantState, bias: Tensor | None, compute_dtype: torch.dtype
    ):
        super().__init__()
        self.out_features, self.in_features = quant_state.shape
        # packed codes, (out * in / 2, 1) uint8; non-persistent so they stay out of every state dict
        self.register_buffer("weight_nf4", weight_nf4, persistent=False)
        self.quant_state = quant_state  # absmax (+ nested absmax), code book, shape, dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.reuse_dequantized = False  # set by `dequantize_once`
        self._dequantized: Tensor | None = None

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> "NF4Linear":
        """Quantize an (out, in) weight on `device` (default: where it already is)."""
        import bitsandbytes.functional as bnbF  # here, not at the top: importing it costs ~120 MB and 2 s

        weight = weight.detach()
        if device is not None:
            weight = weight.to(device)
        packed, state = bnbF.quantize_4bit(
            weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4"
        )
        state.dtype = compute_dtype  # dequantize_4bit returns this dtype
        if bias is not None:
            bias = bias.to(packed.device)
        return cls(packed, state, bias, compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype = torch.float32,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> "NF4Linear":
        """Quantize an nn.Linear's weight (its bias, if any, stays in `compute_dtype`)."""
        return cls.from_weight(linear.weight, linear.bias, compute_dtype, double_quant, device)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        return _NF4Matmul.apply(x.to(self.compute_dtype), self).to(x.dtype)

    def dequantize(self) -> Tensor:
        """The (out, in) weight as the forward sees it, in `compute_dtype`."""
        if self._dequantized is not None:
            return self._dequantized
        import bitsandbytes.functional as bnbF

        weight = bnbF.dequantize_4bit(self.weight_nf4, self.quant_state)
        if self.reuse_dequantized:
            self._dequantized = weight
        return weight

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (in `dtype`, default `compute_dtype`)."""
        weight = self.dequantize().to(dtype or self.compute_dtype)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the buffer; the quant state is plain attributes, so follow it.
        # dtype casts leave the uint8 codes alone (only floating tensors are cast).
        super()._apply(fn, recurse)
        self.quant_state.to(self.weight_nf4.device)
        if self.bias is not None and self.bias.dtype != self.compute_dtype:
            # model.to(bf16) casts the bias too; the layer computes in compute_dtype, as without a bias
            self.bias.data = self.bias.data.to(self.compute_dtype)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}, double_quant={self.quant_state.nested}"
        )


class _NF4Matmul(torch.autograd.Function):
    """x W^T + b for a frozen NF4 weight. The weight gets no gradient, so backward needs W but never
    x: the dequantized W is what gets saved (and what checkpointing drops and replays)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear) -> Tensor:
        weight = layer.dequantize()
        ctx.save_for_backward(weight)
        return F.linear(x, weight, layer.bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (weight,) = ctx.saved_tensors
        return grad_output @ weight, None


@contextmanager
def dequantize_once(model: nn.Module) -> Iterator[None]:
    """Inside, every NF4Linear of `model` dequantizes on first use and reuses that weight; on exit the
    copies are freed. Wrap one optimizer step: 1 dequantization per weight per step (see the module
    docstring), holding the block weights in the compute dtype meanwhile."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    for layer in layers:
        layer.reuse_dequantized = True
    try:
        yield
    finally:
        for layer in layers:
            layer.reuse_dequantized, layer._dequantized = False, None


def quantize_module_nf4(
    module: nn.Module,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    skip: tuple[str, ...] = ("lm_head", "embed_tokens"),
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace every nn.Linear in `module`'s subtree by an NF4Linear, in place, one at a time.

    Modules whose name has a component in `skip` are left alone (norms and embeddings are not
    nn.Linear, so they never are touched). Returns the replaced names, relative to `module`.
    Quantize before injecting adapters: an adapter must be trained against the NF4 weights.
    """
    if any(hasattr(m, "lora_A") for m in module.modules()):
        raise RuntimeError("quantize_module_nf4: the module already has adapters; quantize first, then inject")
    names = [
        name
        for name, m in module.named_modules()
        if type(m) is nn.Linear and not set(name.split(".")) & set(skip)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, child)
        nf4 = NF4Linear.from_linear(linear, compute_dtype, double_quant, device)
        nf4.train(linear.training)  # new modules start in train mode; keep the model's mode
        setattr(parent, child, nf4)
        del linear  # the full-precision weight is freed here unless someone else holds it
    return names


def quantize_nf4(
    model: nn.Module,
    skip: tuple[str, ...] = ("lm_head", "embed_tokens"),
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """Quantize every linear projection of `model` to NF4 (lm_head, embeddings, norms stay as they are)."""
    return quantize_module_nf4(model, compute_dtype, double_quant, skip, device)


def dequantize_nf4(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every NF4Linear (adapter base layers included) by an nn.Linear with its dequantized weight.

    Use it before `merge_adapters` on a QLoRA model, so the update lands on the weights it was trained
    against. Returns the replaced names.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        nf4 = getattr(parent, child)
        setattr(parent, child, nf4.to_linear(dtype).train(nf4.training))
    return names
