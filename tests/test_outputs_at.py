"""`outputs_at`: the last layer runs its queries, o_proj and MLP only at the positions whose outputs are
read (positions.Selection). Hidden states, logits and every gradient must equal the full forward's at
those positions: with padding on either side, unpadded or not, after a shared-prefix cache, in a
last layer with a sliding window or a soft-capped attention, and under both checkpoint policies."""

import pytest
import torch

from minilora.config import ModelConfig
from minilora.lora import LoraConfig, inject_adapters
from minilora.model import CausalLM
from tests.tiny import ragged_batch, randomize_, tiny_gemma_config, tiny_llama_config

CONFIGS = {
    "llama": lambda: tiny_llama_config(),
    "gemma3": lambda: tiny_gemma_config(),  # 6 layers: the last one is global
    "gemma3-sliding-last": lambda: tiny_gemma_config(num_hidden_layers=3),  # window 8 in the last layer
    "gemma3-attn-softcap": lambda: tiny_gemma_config(num_hidden_layers=2, attn_logit_softcapping=4.0),
}


def _model(name: str) -> CausalLM:
    config = ModelConfig.from_hf_dict(CONFIGS[name]().to_dict())
    if name == "gemma3-attn-softcap":
        assert config.attn_logit_softcap == 4.0
    model = CausalLM(config)
    randomize_(model, seed=3)
    return model.eval()


def _ragged(lengths, side, seed=11):
    return ragged_batch(lengths, side, torch.Generator().manual_seed(seed))


def _some_real_positions(mask: torch.Tensor, seed=12) -> torch.Tensor:
    """Flat indices of a few real tokens per row, unsorted, one repeated."""
    gen = torch.Generator().manual_seed(seed)
    real = mask.reshape(-1).nonzero().squeeze(1)
    picked = real[torch.randperm(len(real), generator=gen)[:9]]
    return torch.cat((picked, picked[:1]))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("unpad", [True, False])
def test_selected_outputs_equal_the_full_forward(name, side, unpad):
    model = _model(name)
    ids, mask = _ragged([19, 12, 5], side)
    chosen = _some_real_positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, unpad=unpad)
        part = model(ids, attention_mask=mask, unpad=unpad, outputs_at=chosen)
        by_mask = model(ids, attention_mask=mask, unpad=unpad, logits_at=mask.bool())
    full_hidden = full.hidden.reshape(-1, full.hidden.shape[-1])
    full_logits = full.logits.reshape(-1, full.logits.shape[-1])
    assert part.hidden.shape == (len(chosen), model.config.hidden_size)
    torch.testing.assert_close(part.hidden, full_hidden[chosen], rtol=0, atol=1e-5)
    torch.testing.assert_close(part.logits, full_logits[chosen], rtol=0, atol=1e-5)
    torch.testing.assert_close(by_mask.logits, full_logits[mask.reshape(-1).bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma3-sliding-last"])
def test_selected_outputs_after_a_shared_prefix_cache_and_the_cache_stays_complete(name):
    model = _model(name)
    gen = torch.Generator().manual_seed(13)
    prefix = torch.randint(3, 128, (1, 6), generator=gen)
    rest, mask = _ragged([9, 4, 7], "right", seed=14)
    last = torch.arange(3) * rest.shape[1] + mask.sum(1) - 1  # each row's last real token: scoring's case
    with torch.no_grad():
        cache = model(prefix, use_cache=True).cache
        # the shared-prefix training path: no output needed, only the keys / values
        keys_only = model(prefix, use_cache=True, logits_at="none", outputs_at=torch.zeros(0, dtype=torch.long))
        assert keys_only.hidden.shape == (0, model.config.hidden_size)
        for (k_full, v_full), (k_only, v_only) in zip(cache.layers, keys_only.cache.layers):
            torch.testing.assert_close(k_only, k_full, rtol=0, atol=0)
            torch.testing.assert_close(v_only, v_full, rtol=0, atol=0)
        full = model(rest, attention_mask=mask, cache=cache, use_cache=True)
        part = model(rest, attention_mask=mask, cache=cache, use_cache=True, logits_at="none", outputs_at=last)
        torch.testing.assert_close(part.hidden, full.hidden.reshape(-1, full.hidden.shape[-1])[last], rtol=0, atol=1e-5)
        assert part.logits is None
        # the last layer's keys / values were still computed for every token
        for (k_full, v_full), (k_part, v_part) in zip(full.cache.layers, part.cache.layers):
            torch.testing.assert_close(k_part, k_full, rtol=0, atol=0)
            torch.testing.assert_close(v_part, v_full, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["none", "full", "selective", "mlp"])
def test_lora_gradients_equal_the_full_forward(policy):
    torch.manual_seed(0)
    model = _model("gemma3-sliding-last")
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj", "gate_proj", "up_proj",
                                                                                    "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make every adapter matter
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    model.gradient_checkpointing = policy != "none"
    model.checkpoint_policy = "selective" if policy == "none" else policy
    ids, mask = _ragged([19, 12, 5], "right", seed=15)
    select = torch.zeros_like(mask, dtype=torch.bool)
    select[0, 17], select[1, 10], select[1, 11], select[2, 3] = True, True, True, True
    results = []
    for pruned in (False, True):
        model.zero_grad()
        if pruned:
            logits = model(ids, attention_mask=mask, logits_at=select).logits
        else:
            logits = model(ids, attention_mask=mask).logits[select]
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_logits, full_grads), (part_logits, part_grads) = results
    torch.testing.assert_close(part_logits, full_logits, rtol=0, atol=1e-5)
    assert full_grads.keys() == part_grads.keys() and len(full_grads) == 3 * 7 * 2
    for name, grad in full_grads.items():
        torch.testing.assert_close(part_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_the_last_layer_runs_only_on_the_selected_tokens():
    model = _model("llama")
    ids, mask = _ragged([19, 12, 5], "right")
    seen = {}
    for where, module in (("first", model.model.layers[0].mlp), ("last", model.model.layers[-1].mlp),
                          ("last_q", model.model.layers[-1].self_attn.q_proj),
                          ("last_k", model.model.layers[-1].self_attn.k_proj)):
        module.register_forward_hook(lambda m, args, out, where=where: seen.__setitem__(where, args[0].shape[0]))
    select = torch.zeros_like(mask, dtype=torch.bool)
    select[:, 2] = True
    with torch.no_grad():
        model(ids, attention_mask=mask, logits_at=select)
    assert seen == {"first": 36, "last": 3, "last_q": 3, "last_k": 36}


def test_bad_selections_are_refused():
    model = _model("llama")
    ids, mask = _ragged([6, 3], "right")
    with torch.no_grad(), pytest.raises(ValueError, match="padding position"):
        model(ids, attention_mask=mask, outputs_at=torch.tensor([5, 11]))  # row 1 has 3 tokens: 11 is padding
    with torch.no_grad(), pytest.raises(ValueError, match="not both"):
        model(ids, attention_mask=mask, logits_at=mask.bool(), outputs_at=mask.bool())
    with torch.no_grad(), pytest.raises(ValueError, match="'last'"):
        model(ids, attention_mask=mask, logits_at="last", outputs_at=mask.bool())
    wrong_shape = torch.zeros(2, 4, dtype=torch.bool)  # flattened, (1, 0) here would be (0, 4) of the (2, 6) batch
    wrong_shape[1, 0] = True
    with torch.no_grad(), pytest.raises(ValueError, match=r"bool mask must have the inputs' shape \(2, 6\)"):
        model(ids, attention_mask=mask, logits_at=wrong_shape)
    with torch.no_grad(), pytest.raises(ValueError, match=r"index the flat \(B \* T\) = 12 tokens, found -1"):
        model(ids, attention_mask=mask, outputs_at=torch.tensor([-1]))
