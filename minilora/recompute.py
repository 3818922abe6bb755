"""What gradient checkpointing keeps from a block's forward pass, and what backward recomputes.

Non-reentrant checkpointing re-runs a block's forward when backward first needs one of its
activations. Two policies (PyTorch's selective activation checkpointing picks, op by op, which
outputs are kept):

* "full": keep nothing but the dropout masks, packed 8 per byte (see `dropout_mask`), so the
  recomputed masks are the forward's masks whatever the RNG did in between, and cost no new draws.
* "selective": also keep the outputs of the frozen projections (matmuls whose weight gets no
  gradient) and of the fused attention kernel. Recomputing those is most of the recompute work;
  what is left to recompute is norms, RoPE, activations and the rank-r adapter products. It costs
  those outputs in memory: about (2 q + k + v + 2 * intermediate + 2 * hidden) floats per token per
  layer, e.g. 0.5 MB per token for Gemma 3 270M in fp32 (vs 60 KB for "full": the blocks' inputs
  and 14 KB of packed masks).

The result is identical to no checkpointing in both cases (tests/test_recompute.py).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

CHECKPOINT_POLICIES = ("full", "selective")


@torch.library.custom_op("minilora::dropout_keep_bits", mutates_args=(), device_types="cpu")
def _dropout_keep_bits(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """Which of `numel` elements inverted dropout keeps, packed 8 per byte (uint8): element i is kept
    when the i-th 32-bit draw of SFC64(seed) is >= p * 2^32.

    An op of its own so that checkpointing can keep its small output: the replay then unpacks the
    forward's mask instead of drawing it again."""
    draws = np.random.SFC64(int(seed)).random_raw((numel + 1) // 2).view(np.uint32)[:numel]
    threshold = np.uint32(min(round(p * 2**32), 2**32 - 1))
    return torch.from_numpy(np.packbits(draws >= threshold))


@_dropout_keep_bits.register_fake
def _(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:  # shapes only, for meta / fake tensors
    return seed.new_empty(((numel + 7) // 8,), dtype=torch.uint8)


# see dropout_mask
_MASK_OPS = {torch.ops.aten.bernoulli.p, torch.ops.aten.randint.low, torch.ops.minilora.dropout_keep_bits.default}
_MATMUL_OPS = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}  # op -> index of the weight operand
# fused attention kernels: their outputs (and softmax statistics) are what their backward needs
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name)}


def _keep_masks(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MASK_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_masks_and_frozen_projections(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _MASK_OPS or op in _ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    weight_index = _MATMUL_OPS.get(op)
    if weight_index is not None and not args[weight_index].requires_grad:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_POLICIES = {"full": _keep_masks, "selective": _keep_masks_and_frozen_projections}


def checkpoint_context(policy: str):
    """The `context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`."""
    if policy not in _POLICIES:
        raise ValueError(f"checkpoint policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    return functools.partial(create_selective_checkpoint_contexts, _POLICIES[policy])


def dropout_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout multiplier of `shape`: 1 / (1 - p) with probability 1 - p, else 0; a function
    of the torch RNG state.

    On CPU torch draws Bernoulli samples at ~150 M/s on one core, about a quarter of the matmul each
    mask feeds; numpy's SFC64 gives raw 32-bit draws ~5x faster. So one int64 seed is drawn from
    torch (the run's seed, checkpoint replay and resume all still apply) and numpy expands it into
    the packed mask that both checkpoint policies keep (1 bit per element).
    Elsewhere torch's own generator is fast and used directly."""
    if device.type == "cpu":
        numel = math.prod(shape)
        bits = _dropout_keep_bits(torch.randint(0, 2**62, (1,)), numel, p)
        keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel)).view(shape)
        return keep.to(dtype).mul_(1.0 / (1.0 - p))
    return torch.bernoulli(torch.empty(shape, dtype=dtype, device=device), 1.0 - p) * (1.0 / (1.0 - p))
