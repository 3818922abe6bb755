"""What gradient checkpointing keeps from a block's forward pass, and what backward recomputes.

Non-reentrant checkpointing re-runs a block's forward when backward first needs one of its
activations. Three policies:

* "full": plain checkpointing, nothing kept but each block's input. The replay draws the dropout
  masks again from the RNG state that checkpointing saved at the forward (`preserve_rng_state`),
  so they are the forward's masks.
* "selective": PyTorch's selective activation checkpointing, which picks op by op what is kept: the
  outputs of the adapted projections (`lora_op.lora_linear`: the output and the rank-r product), of
  other frozen projections (matmuls whose weight gets no gradient), of the fused attention kernel
  and the dropout masks, as the dropped positions (see `dropout_drops`). Recomputing those is most of
  the recompute work; what is left to recompute is norms, RoPE and activations. It costs those
  outputs in memory: about (2 q + k + v + 2 * intermediate + 2 * hidden) floats per token per layer,
  e.g. 0.5 MB per token for Gemma 3 270M in fp32 (vs 46 KB for "full").
  Its per-op dispatch costs more than drawing the masks again, which is why "full" does not use it
  just to keep them (benchmarks/NOTES.md, round 6).
* "mlp" (train.py's default): no block is replayed. Backward recomputes only the MLP's gated product
  act(gate) * up, inside its down projection's op (`lora_op.gated_lora_linear`), which therefore keeps
  gate and up but neither act(gate) nor the product: two intermediate-wide tensors per token and
  layer less than no checkpointing. Two more recomputations replace copies of what is kept anyway:
  o_proj's input, attention's output as token rows, is gathered again from the output in attention's
  padded layout, which SDPA keeps; and the normed inputs of q / k / v and of gate / up are normed
  again from the block's kept residual stream (one norm each, however many ops read it: model.py's
  `_saved_as_recomputed`). Everything else backward needs is kept, e.g. q / k / v in attention's
  layout. Where the down projection has no such op (an NF4 base, a DoRA adapter) it falls back to
  "selective" on the feed-forward half (its norms and the MLP). In the benchmark, per step:
  1.06-1.09x (SmolLM2) and 1.03-1.08x (Gemma) against round 12's "mlp" (selective on the
  feed-forward half), 1.10-1.13x against "selective" (benchmarks/NOTES.md, round 13); since round 14
  SmolLM2's peak RSS is 5 % under "selective"'s, Gemma's 3 % over it.

The result is identical to no checkpointing in every case (tests/test_recompute.py).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn

CHECKPOINT_POLICIES = ("full", "selective", "mlp")


@torch.library.custom_op("minilora::dropout_drops", mutates_args=(), device_types="cpu")
def _dropout_drops(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """The flat positions, in increasing order, of the elements that inverted dropout drops among
    `numel` (each independently with probability p), drawn from SFC64(seed); int32 when `numel` fits.

    An op of its own so that selective checkpointing can keep its small output (about p * numel
    positions): the replay then zeroes the forward's positions instead of drawing them again."""
    if p <= SPARSE_DROP_RATE:
        return _dropped_positions_from_gaps(np.random.SFC64(int(seed)), numel, p)
    # element i is dropped when the i-th 32-bit draw is < p * 2^32
    draws = np.random.SFC64(int(seed)).random_raw((numel + 1) // 2).view(np.uint32)[:numel]
    dropped = np.flatnonzero(draws < np.uint32(min(round(p * 2**32), 2**32 - 1)))
    return torch.from_numpy(dropped).to(_position_dtype(numel))


# Up to this rate the dropped elements are drawn directly (one draw per dropped element, 2x faster at
# p = 0.05 than one 32-bit draw per element); above it, one draw per element is cheaper.
SPARSE_DROP_RATE = 0.25


def _dropped_positions_from_gaps(bits: np.random.SFC64, numel: int, p: float, batch: int | None = None) -> torch.Tensor:
    """Positions of i.i.d. Bernoulli(p) drops among `numel`, via the gaps between them: with U uniform on
    (0, 1), floor(log(U) / log(1 - p)) + 1 is geometric (P(gap > k) = (1 - p)^k), so the cumulative sums
    of such gaps, minus one, are the dropped positions. U is a raw 32-bit draw plus 1/2, over 2^32; the
    log runs in float64 and the sums in torch (numpy's exponential sampler and cumsum were 2x slower)."""
    inverse_log_keep = 1.0 / math.log1p(-p)
    expected = numel * p
    if batch is None:  # gaps drawn per round; one round nearly always covers numel
        batch = int(expected + 8 * expected**0.5) + 64
    batch += batch % 2  # whole 64-bit draws: rounds of any size read the same stream
    rounds, end = [], -1  # end: the last dropped position so far
    while end < numel:
        draws = bits.random_raw(batch // 2).view(np.uint32)
        uniform = torch.from_numpy(draws.astype(np.float64)).add_(0.5).mul_(2.0**-32)
        gaps = uniform.log_().mul_(inverse_log_keep).to(torch.int64).add_(1)  # the cast floors: values >= 0
        positions = torch.cumsum(gaps, 0).add_(end)
        rounds.append(positions)
        end = int(positions[-1])
    dropped = rounds[0] if len(rounds) == 1 else torch.cat(rounds)
    return dropped[: int(torch.searchsorted(dropped, numel))].to(_position_dtype(numel))


def _position_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= 2**31 else torch.int64  # int32: half the memory kept for the replay


@_dropout_drops.register_fake
def _(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:  # shapes only, for meta / fake tensors
    count = torch.library.get_ctx().new_dynamic_size()  # how many are dropped is known only after the draw
    return seed.new_empty((count,), dtype=_position_dtype(numel))


@torch.library.custom_op("minilora::dropout_keep_bits_on_device", mutates_args=())
def _dropout_keep_bits_on_device(like: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """Which elements the device's generator keeps (CUDA's is fast), packed 8 per byte (uint8): positions
    would need a host sync per mask to size them. Kept by selective checkpointing like the CPU op."""
    return pack_bits(torch.rand(numel, device=like.device) >= p)


@_dropout_keep_bits_on_device.register_fake
def _(like: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    return like.new_empty(((numel + 7) // 8,), dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """1-D bool -> uint8, 8 per byte, first flag in the high bit (numpy.packbits' order), any device."""
    padded = torch.nn.functional.pad(flags.to(torch.uint8), (0, -flags.numel() % 8)).view(-1, 8)
    return (padded << _bit_shifts(flags.device)).sum(-1, dtype=torch.uint8)  # the bits do not overlap


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` flags as uint8 0 / 1."""
    return ((packed.unsqueeze(-1) >> _bit_shifts(packed.device)) & 1).view(-1)[:count]


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)  # made there: no host-to-device copy


# see dropout_drops; randint draws the CPU mask's seed
_MASK_OPS = {torch.ops.aten.randint.low, torch.ops.minilora.dropout_drops.default,
             torch.ops.minilora.dropout_keep_bits_on_device.default}
_MATMUL_OPS = {torch.ops.aten.mm.default: 1, torch.ops.aten.addmm.default: 2}  # op -> index of the weight operand
# fused attention kernels: their outputs (and softmax statistics) are what their backward needs
_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention") if hasattr(torch.ops.aten, name)}


_KEPT_OPS: set = set()  # further ops whose outputs "selective" keeps, added with `keep_outputs_of`


def keep_outputs_of(op) -> None:
    """Have selective checkpointing keep `op`'s outputs, so its replay returns them without running
    the op again (e.g. `lora_op.lora_linear`: the adapted projections)."""
    _KEPT_OPS.add(op)


def _keep_masks_and_frozen_projections(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _MASK_OPS or op in _ATTENTION_OPS or op in _KEPT_OPS:
        return CheckpointPolicy.MUST_SAVE
    weight_index = _MATMUL_OPS.get(op)
    if weight_index is not None and not args[weight_index].requires_grad:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_context(policy: str):
    """The `context_fn` for `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    if policy == "full":
        return noop_context_fn
    return functools.partial(create_selective_checkpoint_contexts, _keep_masks_and_frozen_projections)


def dropout_mask(shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Inverted-dropout multiplier of `shape`: 0 where `dropout_drops` drops, else 1 / (1 - p)."""
    return zero_dropped(torch.full(shape, 1.0 / (1.0 - p), dtype=dtype, device=device),
                        dropout_drops(shape, p, device))


def dropout_drops(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Which elements of `shape` inverted dropout drops (each with probability p); a function of the
    torch RNG state. On CPU: their flat positions (int32 or int64, `_dropout_drops`); on other
    devices: the kept ones as flags packed 8 per byte (uint8). `zero_dropped` applies either.

    On CPU torch draws Bernoulli samples at ~150 M/s on one core, about a quarter of the matmul each
    mask feeds; numpy's SFC64 is ~5x faster per 32-bit draw, and at low rates only the dropped
    elements need a draw (`_dropped_positions_from_gaps`). So one int64 seed is drawn from torch (the
    run's seed, checkpoint replay and resume all still apply) and numpy expands it. Positions also
    apply faster than flags there: zeroing p * numel elements beats a uint8 x float product, which
    torch's CPU kernels run unvectorised (benchmarks/NOTES.md, round 11).
    Elsewhere the device's own generator is fast and used directly. Either form is what the
    selective checkpoint policy keeps for the replay."""
    numel = math.prod(shape)
    if _draws_on_host(device):
        return _dropout_drops(torch.randint(0, 2**62, (1,)), numel, p)
    return _dropout_keep_bits_on_device(torch.empty(0, device=device), numel, p)


def zero_dropped(t: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Sets the elements of `t` that `drops` (from `dropout_drops` for t's shape) drops to 0, in place;
    t must be contiguous."""
    if drops.dtype == torch.uint8:  # kept flags, packed
        return t.mul_(unpack_bits(drops, t.numel()).view(t.shape))
    t.view(-1)[drops] = 0  # positions: only the dropped elements are written
    return t


def _draws_on_host(device: torch.device) -> bool:
    return device.type == "cpu"
