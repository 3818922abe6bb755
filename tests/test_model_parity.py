"""Logits parity with transformers on tiny random Gemma 3 and Llama configs (fp32, max-abs-diff <= 1e-4)."""

import copy

import pytest
import torch

from minilora.config import ModelConfig
from minilora.model import CausalLM
from tests.tiny import hf_model, ragged_batch, tiny_gemma_config, tiny_llama_config, twin

TOL = 1e-4
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CONFIGS = {
    "llama-untied": lambda: tiny_llama_config(),
    "llama-tied": lambda: tiny_llama_config(tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: tiny_llama_config(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}),
    "gemma3": lambda: tiny_gemma_config(),
    "gemma3-untied": lambda: tiny_gemma_config(tie_word_embeddings=False),
    "gemma3-linear-global-rope": lambda: tiny_gemma_config(
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        }
    ),
    # transformers 5.x ignores attn_logit_softcapping for Gemma 3 (never passes it to attention), so the
    # oracle covers the final soft-capping only; attention soft-capping is tested by hand below
    "gemma3-final-softcap": lambda: tiny_gemma_config(final_logit_softcapping=3.0),
}


def _pair(name):
    hf = hf_model(CONFIGS[name]())
    return hf, twin(hf)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    hf, ours = _pair(name)
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(1))  # > sliding window 8
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("original_max", [16, None])
def test_a_legacy_rope_scaling_next_to_rope_parameters_reads_as_transformers_reads_it(family, original_max):
    """A file with both fields: transformers takes the legacy rope_scaling (Gemma 3: merged into the
    global layers' dict) and, when llama3 scaling leaves original_max_position_embeddings out, the
    model's max_position_embeddings."""
    from transformers import AutoConfig

    scaling = {key: value for key, value in LLAMA3_SCALING.items()
               if key != "original_max_position_embeddings" or original_max is not None}
    raw = (tiny_llama_config() if family == "llama" else tiny_gemma_config()).to_dict()
    raw.update(rope_theta=500000.0, max_position_embeddings=12, rope_scaling=scaling)
    if family == "llama":
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    else:
        raw["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}
    hf = hf_model(AutoConfig.for_model(**copy.deepcopy(raw)))  # transformers edits the dicts it is given
    read = hf.config.rope_parameters
    assert read.get("full_attention", read)["rope_type"] == "llama3"  # the oracle did read the legacy field
    config = ModelConfig.from_hf_dict(raw)  # the file as written, not transformers' normalised copy
    assert (config.rope_global.rope_type, config.rope_global.theta) == ("llama3", 500000.0)
    ours = CausalLM(config)
    ours.load_state_dict(hf.state_dict(), strict=False)
    ours.tie_weights()
    ids = torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours.eval()(ids).logits
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["llama-untied", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded_rows(name, side):
    """Each padded row gives the logits transformers gives for that row alone, at its real tokens."""
    hf, ours = _pair(name)
    gen = torch.Generator().manual_seed(2)
    lengths = [19, 12, 5]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, 1
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            expected = hf(input_ids=row[None]).logits[0]
            sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            assert (got[i, sl] - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["llama-untied", "gemma3"])
def test_padded_batch_matches_transformers_masking(name):
    """Same batch, same mask, same position ids given to both implementations."""
    hf, ours = _pair(name)
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["llama-tied", "gemma3"])
def test_logits_at_selected_positions(name):
    _, ours = _pair(name)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[0, 3], select[1, 7], select[1, 9] = True, True, True
    with torch.no_grad():
        full = ours(ids).logits
        picked = ours(ids, logits_at=select).logits
        last = ours(ids, logits_at="last").logits
        none = ours(ids, logits_at="none")
    torch.testing.assert_close(picked, full[select], rtol=0, atol=1e-5)
    torch.testing.assert_close(last, full[:, -1], rtol=0, atol=1e-5)
    assert none.logits is None and none.hidden.shape == (2, 10, 64)


@pytest.mark.parametrize("name", ["llama-untied", "gemma3"])
def test_cache_continuation_equals_full_forward(name):
    """Prefix through the cache, then the rest, equals one forward over everything — also with a
    batch-1 prefix cache broadcast over a batch (the shared-prefix path) and past the sliding window."""
    _, ours = _pair(name)
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 128, (1, 6), generator=gen)
    rest = torch.randint(3, 128, (3, 9), generator=gen)
    with torch.no_grad():
        full = ours(torch.cat((prefix.expand(3, -1), rest), dim=1)).logits[:, 6:]
        cached = ours(prefix, use_cache=True).cache
        got = ours(rest, cache=cached).logits
    assert (got - full).abs().max().item() <= TOL


def test_gradient_checkpointing_gives_identical_gradients():
    hf, ours = _pair("gemma3")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    grads = []
    for use_ckpt in (False, True):
        ours.zero_grad()
        ours.train()
        ours.gradient_checkpointing = use_ckpt
        ours(ids).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-untied", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("policy", ["none", "full", "selective", "mlp"])
def test_unpadded_forward_and_gradients_equal_padded(name, side, policy):
    """Running the dense layers on the real tokens only changes nothing at the real tokens: logits,
    and every gradient, with and without checkpointing; padding never reaches a projection."""
    _, ours = _pair(name)
    ids, mask = ragged_batch([19, 12, 5], side, torch.Generator().manual_seed(7))
    ours.train()
    ours.gradient_checkpointing = policy != "none"
    ours.checkpoint_policy = "full" if policy == "none" else policy
    rows_seen = []
    hook = ours.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
    )
    results = []
    for unpad in (False, True):
        ours.zero_grad()
        rows_seen.clear()
        logits = ours(ids, attention_mask=mask, logits_at=mask.bool(), unpad=unpad).logits
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}, rows_seen[0]))
    hook.remove()
    (padded, padded_grads, padded_rows), (unpadded, unpadded_grads, unpadded_rows) = results
    assert padded_rows == ids.numel() and unpadded_rows == int(mask.sum()) == 36
    torch.testing.assert_close(unpadded, padded, rtol=0, atol=1e-5)
    for param, grad in padded_grads.items():
        torch.testing.assert_close(unpadded_grads[param], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-untied", "gemma3"])
def test_unpadded_rows_attend_to_a_shared_prefix_cache(name):
    """The shared-prefix training path: a batch-1 cache broadcast over a ragged, unpadded batch."""
    _, ours = _pair(name)
    gen = torch.Generator().manual_seed(8)
    prefix = torch.randint(3, 128, (1, 6), generator=gen)
    rest, mask = ragged_batch([9, 4, 7], "right", gen)
    with torch.no_grad():
        cache = ours(prefix, use_cache=True).cache
        got = ours(rest, attention_mask=mask, cache=cache, logits_at=mask.bool()).logits
        for i, n in enumerate(mask.sum(1).tolist()):
            alone = ours(torch.cat((prefix, rest[i : i + 1, :n]), dim=1)).logits[0, 6:]
            torch.testing.assert_close(got[mask[:i].sum() : mask[: i + 1].sum()], alone, rtol=0, atol=TOL)


def test_attention_softcap_matches_explicit_formula():
    from minilora.model import _softcapped_attention

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen) * 3 for _ in range(3))
    cap, scale = 2.0, 8**-0.5
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / cap) * cap
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(_softcapped_attention(q, k, v, None, scale, cap), expected)
    # a huge cap is the identity: the explicit path then equals SDPA
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(_softcapped_attention(q, k, v, None, scale, 1e9), plain, rtol=1e-5, atol=1e-5)


def test_attention_softcap_path_in_the_model_equals_sdpa_at_a_huge_cap():
    """The model's soft-capped attention branch (Gemma 2 style configs) on a padded, unpadded batch and
    with a selection: with a cap far above every score it is the plain SDPA model, logits and gradients."""
    _, plain = _pair("gemma3")
    capped = _pair("gemma3")[1]
    capped.load_state_dict(plain.state_dict())
    for layer in capped.model.layers:
        layer.self_attn.softcap = 1e9
    ids, mask = ragged_batch([11, 6, 9], "right", torch.Generator().manual_seed(9))
    last = torch.arange(3) * ids.shape[1] + mask.sum(1) - 1
    results = []
    for model in (plain, capped):
        model.zero_grad()
        logits = model(ids, attention_mask=mask, logits_at=last).logits
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    assert results[0][1].abs().sum() > 0
