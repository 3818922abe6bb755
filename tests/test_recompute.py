"""Gradient checkpointing policies and the dropout masks they replay (minilora/recompute.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minilora.recompute
from minilora.lora import LoraConfig, adapter_parameters, inject_adapters
from minilora.model import CausalLM, RMSNorm
from minilora.recompute import (_dropped_positions_from_gaps, checkpoint_context, dropout_drops, dropout_mask,
                                pack_bits, unpack_bits, zero_dropped)

from .tiny import hf_model, nonzero_lora_B_, tiny_gemma_config, tiny_llama_config, twin


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _adapted(kind: str, dropout: float, variant: str = "lora") -> CausalLM:
    hf = hf_model(tiny_gemma_config() if kind == "gemma3" else tiny_llama_config())
    model = twin(hf)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear", variant=variant))
    nonzero_lora_B_(model)  # so the adapters shape the loss and every gradient
    return model.train()


def _step(model: CausalLM, mode: str, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """Gradients of the adapters after one forward / backward, the aten ops run in backward, and the
    RNG's next draw after it (a replay must leave the run's random stream where it was)."""
    model.gradient_checkpointing = mode != "none"
    if mode != "none":
        model.checkpoint_policy = mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same dropout masks in every mode
    loss = model(ids).logits.logsumexp(-1).mean()
    with OpCounter() as counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, counter.counts, int(torch.randint(0, 2**62, (1,)))


@pytest.fixture(params=["host", "device"])
def mask_draws(request, monkeypatch):
    """Masks drawn as on CPU (numpy) or as on CUDA (the device generator, packed by torch ops); the
    second runs here on CPU tensors, so its logic is tested without a GPU."""
    if request.param == "device":
        monkeypatch.setattr(minilora.recompute, "_draws_on_host", lambda device: False)
    return request.param


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_policies_give_the_gradients_of_no_checkpointing(kind, mask_draws):
    model = _adapted(kind, dropout=0.3)
    ids = torch.randint(3, 150, (3, 20), generator=torch.Generator().manual_seed(1))
    reference, plain_ops, next_draw = _step(model, "none", ids)
    assert len(reference) == len(adapter_parameters(model))
    results = {mode: _step(model, mode, ids) for mode in ("full", "selective", "mlp")}
    for mode, (grads, _, after) in results.items():
        assert after == next_draw, mode
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-6, msg=f"{mode}: {name}")
    # full replays every adapted projection (one lora_linear op each) in backward; selective keeps
    # their outputs, so its backward runs exactly the matmuls of no checkpointing: none replayed
    n_adapted = sum(1 for n, _ in model.named_modules() if n.endswith("base_layer"))
    assert results["full"][1].get("lora_linear", 0) == n_adapted, results["full"][1]
    assert results["selective"][1].get("lora_linear", 0) == 0 and plain_ops.get("lora_linear", 0) == 0
    assert plain_ops.get("mm", 0) > 0
    assert results["selective"][1].get("mm", 0) == plain_ops["mm"], (results["selective"][1], plain_ops)
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert results["full"][1].get(attention, 0) == model.config.num_layers  # replayed once per block
    assert results["selective"][1].get(attention, 0) == 0  # kept
    # selective keeps the masks (dropped positions or packed flags): its backward draws nothing; full
    # draws each mask again, from the restored RNG state (the gradients above show they are the forward's)
    draw = "dropout_drops" if mask_draws == "host" else "dropout_keep_bits_on_device"
    n_masks = sum(1 for n, _ in model.named_modules() if n.endswith("lora_dropout"))
    assert results["full"][1].get(draw, 0) == n_masks, results["full"][1]
    selective_ops = results["selective"][1]
    assert selective_ops.get(draw, 0) == 0 and selective_ops.get("randint", 0) == 0, selective_ops
    # mlp: no block is replayed, so backward runs none of the forward's ops (RoPE and layout, norms,
    # projections, masks) and the matmuls of no checkpointing; only the MLP's activation is recomputed,
    # once per block, inside the down projection's op (lora_op.gated_lora_linear)
    mlp_ops = results["mlp"][1]
    assert mlp_ops.get("mm", 0) == plain_ops["mm"] and mlp_ops.get("lora_linear", 0) == 0
    assert mlp_ops.get(draw, 0) == 0 and mlp_ops.get(attention, 0) == 0
    assert mlp_ops.get("to_heads", 0) == plain_ops.get("to_heads", 0) == 0
    assert selective_ops.get("to_heads", 0) == 3 * model.config.num_layers  # q, k, v replayed per block
    # the norms before attention and before the MLP run again, once each, for the adapters that keep
    # their output (q, k, v; gate, up): see test_mlp_policy_keeps_no_normed_input
    assert mlp_ops.get("rms_norm", 0) == 2 * model.config.num_layers
    assert plain_ops.get("rms_norm", 0) == 0 < selective_ops.get("rms_norm", 0)
    activation = "gelu" if model.config.mlp_activation == "gelu_tanh" else "silu"
    assert mlp_ops.get(activation, 0) == selective_ops.get(activation, 0) == model.config.num_layers
    assert plain_ops.get(activation, 0) == 0


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_mlp_policy_gathers_attention_output_rows_again_instead_of_keeping_them(kind):
    """On a padded batch o_proj's input is gathered from attention's (B, heads, T, hd) output, which
    SDPA keeps anyway: under "mlp" backward gathers it again (one from_heads per layer) and the
    gradients are those of no checkpointing, which keeps the rows."""
    model = _adapted(kind, dropout=0.3)
    ids = torch.randint(3, 150, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 14:] = mask[2, 9:] = 0  # right padding: the dense layers run on the 43 real tokens only
    runs = {}
    for mode in ("none", "mlp"):
        model.gradient_checkpointing, model.checkpoint_policy = mode == "mlp", "mlp"
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = model(ids, attention_mask=mask).logits[mask.bool()].logsumexp(-1).mean()
        with OpCounter() as counter:
            loss.backward()
        runs[mode] = ({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, counter.counts)
    for name, grad in runs["mlp"][0].items():
        torch.testing.assert_close(grad, runs["none"][0][name], rtol=0, atol=1e-6, msg=name)
    assert runs["mlp"][1].get("from_heads", 0) == model.config.num_layers
    assert runs["none"][1].get("from_heads", 0) == 0


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_mlp_policy_keeps_no_normed_input(kind):
    """q, k, v and gate, up keep their input (a norm's output) for their adapters' gradients. Under "mlp"
    autograd keeps a recipe instead, which norms the kept residual stream again in backward (once per
    norm: the count is in test_policies_give_the_gradients_of_no_checkpointing). Walks the graph after
    the forward and looks for any kept tensor that is a norm's output."""
    model = _adapted(kind, dropout=0.3)
    ids = torch.randint(3, 150, (3, 20), generator=torch.Generator().manual_seed(1))
    kept_per_mode = {}
    for mode in ("none", "mlp"):
        model.gradient_checkpointing, model.checkpoint_policy = mode == "mlp", "mlp"
        normed = []  # held, so that no other tensor can reuse their memory during the forward
        hooks = [m.register_forward_hook(lambda _m, _i, out: normed.append(out))
                 for m in model.modules() if isinstance(m, RMSNorm)]
        loss = model(ids).logits.logsumexp(-1).mean()
        for hook in hooks:
            hook.remove()
        addresses = {t.data_ptr() for t in normed}
        kept_per_mode[mode] = [node.name() for node in _graph_nodes(loss.grad_fn)
                               for t in getattr(node, "saved_tensors", ()) or ()
                               if t is not None and t.data_ptr() in addresses]
    # five adapted projections read a norm's output in each layer
    assert len(kept_per_mode["none"]) == 5 * model.config.num_layers, kept_per_mode["none"]
    assert kept_per_mode["mlp"] == []


def _graph_nodes(root):
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return seen


def test_mlp_policy_checkpoints_the_feed_forward_half_where_the_down_projection_is_not_fused():
    """DoRA's down projection has no fused op (nor has an NF4 one: tests/test_quant.py): "mlp" then runs
    the feed-forward half under selective checkpointing, with the same gradients."""
    model = _adapted("llama", dropout=0.3, variant="dora")
    assert not any(layer.mlp.recomputes_product() for layer in model.model.layers)
    ids = torch.randint(3, 150, (3, 20), generator=torch.Generator().manual_seed(1))
    reference, plain_ops, _ = _step(model, "none", ids)
    grads, mlp_ops, _ = _step(model, "mlp", ids)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=1e-6, msg=name)
    # the replay: the feed-forward norm and the activation once per block, no attention
    assert mlp_ops.get("rms_norm", 0) == model.config.num_layers and plain_ops.get("rms_norm", 0) == 0
    assert mlp_ops.get("silu", 0) == model.config.num_layers
    assert mlp_ops.get("_scaled_dot_product_flash_attention_for_cpu", 0) == 0


def test_dropout_mask_rate_values_and_replay(mask_draws):
    torch.manual_seed(5)
    mask = dropout_mask(torch.Size((1000, 1000)), 0.05, torch.device("cpu"), torch.float32)
    values = mask.unique()
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / 0.95]))
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002  # 1e6 draws: 5 sigma is ~0.001
    assert abs(mask.mean().item() - 1.0) < 0.003  # inverted dropout keeps the expectation
    torch.manual_seed(5)
    again = dropout_mask(torch.Size((1000, 1000)), 0.05, torch.device("cpu"), torch.float32)
    assert torch.equal(mask, again)  # a function of the torch RNG state
    other = dropout_mask(torch.Size((1000, 1000)), 0.05, torch.device("cpu"), torch.float32)
    assert not torch.equal(mask, other)
    # rows are not copies of each other (one seed expands into independent draws)
    assert not torch.equal(mask[0], mask[1])


def test_sparse_drop_draws_are_bernoulli_and_do_not_depend_on_the_round_size():
    """Low rates draw the gaps between dropped elements (recompute._dropped_positions_from_gaps)."""
    dropped = _dropped_positions_from_gaps(np.random.SFC64(7), 2_000_003, 0.05).numpy()
    flags = np.ones(2_000_003, dtype=bool)
    flags[dropped] = False
    assert np.all(np.diff(dropped) > 0) and dropped[0] >= 0 and dropped[-1] < flags.size
    assert abs(dropped.size / flags.size - 0.05) < 5 * (0.05 * 0.95 / flags.size) ** 0.5
    gaps = np.diff(dropped)  # geometric: P(gap = 1) = p, mean 1 / p
    assert abs((gaps == 1).mean() - 0.05) < 0.005 and abs(gaps.mean() - 20) < 0.5
    # independent neighbours: a dropped element's successor is dropped at the base rate
    assert abs((~flags[dropped[dropped < flags.size - 1] + 1]).mean() - 0.05) < 0.005
    # rounds of 3 gaps (rounded up to 4: whole 64-bit draws) read the same stream as one round
    small_rounds = _dropped_positions_from_gaps(np.random.SFC64(7), 2_000_003, 0.05, batch=3)
    assert np.array_equal(dropped, small_rounds.numpy())


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])  # both sides of SPARSE_DROP_RATE
def test_dropout_mask_odd_sizes_and_other_rates(p, mask_draws):
    # 91 and 1e6 + 3 elements: neither a whole number of packed bytes nor of 64-bit draws
    small = dropout_mask(torch.Size((7, 13)), p, torch.device("cpu"), torch.float32)
    assert small.shape == (7, 13)
    assert all(v == 0 or v == pytest.approx(1 / (1 - p)) for v in small.unique().tolist())
    mask = dropout_mask(torch.Size((1_000_003,)), p, torch.device("cpu"), torch.float32)
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / 1e6) ** 0.5
    # the last element is drawn too (not left at the unpacked padding)
    tails = [dropout_mask(torch.Size((9,)), p, torch.device("cpu"), torch.float32)[-1].item() for _ in range(200)]
    assert 0.0 in tails and any(t > 0 for t in tails)


@pytest.mark.parametrize("op,first", [("dropout_drops", torch.tensor([5])),
                                      ("dropout_keep_bits_on_device", torch.empty(0))])
def test_the_mask_ops_are_well_formed_torch_ops(op, first):
    """Schema, fake-tensor shapes (meta / compile) and autograd registration of the custom ops."""
    results = torch.library.opcheck(getattr(torch.ops.minilora, op).default, (first, 91, 0.5))
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("p", [0.05, 0.5])  # gaps and per-element draws
def test_cpu_drops_are_positions_and_both_forms_zero_the_same_elements(p):
    torch.manual_seed(3)
    drops = dropout_drops(torch.Size((37, 29)), p, torch.device("cpu"))
    assert drops.dtype == torch.int32 and drops.dim() == 1  # half of int64's memory, kept for the replay
    assert drops.numel() > 0 and bool((drops[1:] > drops[:-1]).all()) and 0 <= drops.min() and drops.max() < 37 * 29
    keep = torch.ones(37 * 29, dtype=torch.bool)
    keep[drops.long()] = False
    values = torch.randn(37, 29, generator=torch.Generator().manual_seed(4))
    by_positions = zero_dropped(values.clone(), drops)
    by_flags = zero_dropped(values.clone(), pack_bits(keep))  # the form device draws give
    assert torch.equal(by_positions, values * keep.view(37, 29))
    assert torch.equal(by_flags, by_positions)
    assert minilora.recompute._position_dtype(2**31 + 1) == torch.int64  # positions past int32's range


@pytest.mark.parametrize("count", [1, 8, 91, 1000])
def test_pack_bits_matches_numpy_and_round_trips(count):
    flags = torch.rand(count, generator=torch.Generator().manual_seed(count)) < 0.5
    packed = pack_bits(flags)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(flags.numpy()))
    assert torch.equal(unpack_bits(packed, count), flags.to(torch.uint8))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="checkpoint policy must be one of"):
        checkpoint_context("sometimes")
