"""LoRA / DoRA invariants (identity at init, frozen base, exact merge) and parity with peft.

Hosts are tiny random transformers models: injection works on any module tree by name.
"""

import copy

import pytest
import torch

from minilora.lora import (
    ADAPTER_VARIANTS,
    DoRALinear,
    LoRALinear,
    LoraConfig,
    adapter_parameters,
    adapter_state_dict,
    disable_adapters,
    inject_adapters,
    lora_modules,
    merge_adapters,
    merged_for_inference,
    trainable_summary,
    unmerge_adapters,
)
from tests.tiny import hf_model, tiny_gemma_config, tiny_llama_config, twin

FAMILIES = {"llama": lambda: tiny_llama_config(num_hidden_layers=2), "gemma": lambda: tiny_gemma_config()}
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 17], [3, 4, 99, 12, 127, 8, 0, 64]])  # (B, T)


def logits(model, ids=IDS):
    return model(ids).logits


def randomize_adapters_(model, seed=1):
    """Non-zero B (and a perturbed magnitude) so the adapters actually change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_injection_is_identity(family, variant):
    model = hf_model(FAMILIES[family]())
    before = logits(model)
    names = inject_adapters(model, LoraConfig(r=4, alpha=8, variant=variant))
    assert len(names) == 7 * model.config.num_hidden_layers
    assert all(isinstance(model.get_submodule(n), ADAPTER_VARIANTS[variant]) for n in names)
    assert not any(m.training for m in model.modules())  # new modules follow the model's eval mode (dropout off)
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_updates_only_adapters(variant):
    model = hf_model(tiny_llama_config(num_hidden_layers=2)).train()
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.1, variant=variant))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in adapter_state_dict(model).items()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter)

    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None, f"{name} got a gradient"
            assert torch.equal(param, frozen[name]), f"{name} changed"
    for name, value in adapter_state_dict(model).items():
        assert not torch.equal(value, adapter[name]), f"{name} did not change"


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_exact_and_unmerge_restores(family, variant):
    model = hf_model(FAMILIES[family]())
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    inject_adapters(model, LoraConfig(r=4, alpha=8, variant=variant, use_rslora=family == "gemma"))
    randomize_adapters_(model)
    adapted = logits(model)
    assert (adapted - logits(hf_model(FAMILIES[family]()))).abs().max() > 1e-2  # the adapter matters

    merge_adapters(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    model.eval()  # eval must not change anything either way
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)

    unmerge_adapters(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    for name, value in model.state_dict().items():
        if ".lora_" not in name:
            original = base[name.replace(".base_layer.", ".")]
            torch.testing.assert_close(value, original, atol=1e-6, rtol=0, msg=f"{name} not restored")


def test_disable_adapters():
    model = hf_model(tiny_llama_config(num_hidden_layers=2))
    base = logits(model)
    inject_adapters(model, LoraConfig(r=4, variant="dora"))
    randomize_adapters_(model)
    adapted = logits(model)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), adapted)
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge_adapters"):
        with disable_adapters(model):
            pass


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_for_inference_matches_and_puts_the_original_weights_back(variant):
    model = twin(hf_model(tiny_gemma_config()))  # minilora's model: unmerged LoRA runs as lora_linear
    inject_adapters(model, LoraConfig(r=4, alpha=8, variant=variant))
    randomize_adapters_(model)
    adapted = logits(model)
    originals = {name: m.base_layer.weight for name, m in lora_modules(model)}
    bits = {name: w.detach().clone() for name, w in originals.items()}
    with torch.no_grad(), merged_for_inference(model):
        for name, module in lora_modules(model):
            assert module.merged and module.base_layer.weight is not originals[name]
            assert not module.base_layer.weight.requires_grad
        torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    for name, module in lora_modules(model):
        assert not module.merged and module.base_layer.weight is originals[name], f"{name} not restored"
        assert torch.equal(module.base_layer.weight, bits[name]), f"{name} changed"
    assert torch.equal(logits(model), adapted)


def test_merged_for_inference_leaves_what_it_cannot_merge_exactly_and_restores_on_error():
    model = twin(hf_model(tiny_llama_config(num_hidden_layers=2)))
    inject_adapters(model, LoraConfig(r=4))
    attn = model.model.layers[0].self_attn
    attn.q_proj.base_layer.weight.data = attn.q_proj.base_layer.weight.data.bfloat16()  # update would round
    attn.k_proj.disabled = True  # e.g. a baseline run
    attn.v_proj.base_layer.weight.requires_grad_(True)  # a trained base weight
    kept = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"}
    originals = {name: m.base_layer.weight for name, m in lora_modules(model)}
    with pytest.raises(KeyError, match="inside"):
        with merged_for_inference(model):
            assert {name for name, m in lora_modules(model) if not m.merged} == kept
            assert all(m.base_layer.weight is originals[name] for name, m in lora_modules(model) if name in kept)
            raise KeyError("inside")
    assert not any(m.merged for _, m in lora_modules(model))
    assert all(m.base_layer.weight is originals[name] for name, m in lora_modules(model))


def test_merged_for_inference_refuses_a_backward_instead_of_dropping_the_adapters_gradients():
    model = twin(hf_model(tiny_llama_config(num_hidden_layers=2)))
    inject_adapters(model, LoraConfig(r=4))
    model.model.layers[0].self_attn.v_proj.base_layer.weight.requires_grad_(True)  # trained: stays unmerged
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with merged_for_inference(model):
        # the other layers' merged weights are constants: without the guard, only v_proj's adapter and
        # base weight would get gradients, and the rest of the adapters silently none
        loss = model(ids).logits.square().mean()
        with pytest.raises(RuntimeError, match="does not require grad"):
            loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" in name)
    model(ids).logits.square().mean().backward()  # outside the block, training works as before
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_" in name)


def test_all_linear_skips_lm_head_and_summary():
    model = hf_model(tiny_llama_config(num_hidden_layers=2))
    names = inject_adapters(model, LoraConfig(r=2, target_modules="all-linear"))
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    r, n_layers, hidden, inter, kv = 2, 2, 64, 96, 32  # kv = 2 heads * 16
    per_layer = sum(r * (i + o) for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)])
    per_layer += sum(r * (i + o) for i, o in [(hidden, inter), (hidden, inter), (inter, hidden)])
    total = sum(p.numel() for p in model.parameters())
    assert trainable_summary(model) == (
        f"trainable params: {n_layers * per_layer:,} || all params: {total:,} || "
        f"trainable%: {100 * n_layers * per_layer / total:.4f}"
    )


@pytest.mark.parametrize(
    "family,variant,rslora,dropout",
    [
        ("llama", "lora", False, 0.0),
        ("llama", "lora", False, 0.1),
        ("gemma", "lora", True, 0.0),
        ("llama", "dora", False, 0.0),
        ("gemma", "dora", False, 0.1),
    ],
)
def test_parity_with_peft(family, variant, rslora, dropout, monkeypatch):
    """Same A, B (and m) copied into peft: same logits and same gradients, DoRA dropout path included."""
    import minilora.lora

    # masks drawn as torch.nn.Dropout draws them, so both stacks drop the same entries (our own
    # faster draw is tested in tests/test_recompute.py)
    monkeypatch.setattr(minilora.lora, "dropout_mask", lambda shape, p, device, dtype:
                        torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p) * (1 / (1 - p)))
    monkeypatch.setattr(minilora.lora, "dropout_drops", lambda shape, p, device:  # plain LoRA's op: positions
                        torch.empty(shape, device=device).bernoulli_(1 - p).flatten().eq(0).nonzero().flatten())
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict

    ours = hf_model(FAMILIES[family]())
    targets = ["q_proj", "v_proj", "down_proj"]
    shared = dict(r=4, target_modules=targets, use_rslora=rslora)
    peft_config = PeftLoraConfig(lora_alpha=8, lora_dropout=dropout, use_dora=variant == "dora", **shared)
    peft_model = get_peft_model(copy.deepcopy(ours), peft_config)
    inject_adapters(ours, LoraConfig(alpha=8, dropout=dropout, variant=variant, **shared))
    if variant == "dora":  # the magnitude is initialised from the base weights exactly as peft does
        peft_sd = {k: v for k, v in peft_model.state_dict().items() if "lora_magnitude_vector" in k}
        for name, m in adapter_state_dict(ours).items():
            if name.endswith("lora_magnitude_vector"):
                key = f"base_model.model.{name}.default.weight"
                torch.testing.assert_close(m, peft_sd[key], atol=1e-6, rtol=0)
    randomize_adapters_(ours)
    peft_keys = {f"base_model.model.{k}": v for k, v in adapter_state_dict(ours).items()}  # as in peft's files
    result = set_peft_model_state_dict(peft_model, peft_keys)
    assert not result.unexpected_keys

    if dropout:
        ours.train(), peft_model.train()
    outputs = []
    for model in (ours, peft_model):
        torch.manual_seed(0)  # the same dropout masks, drawn in the same module order
        out = model(IDS).logits
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)

    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            peft_name = "base_model.model." + name.replace(".weight", ".default.weight")
            if name.endswith("lora_magnitude_vector"):
                peft_name = f"base_model.model.{name}.default.weight"
            torch.testing.assert_close(param.grad, peft_grads[peft_name], atol=1e-5, rtol=1e-4, msg=name)


def test_dora_is_one_subclass():
    assert issubclass(DoRALinear, LoRALinear) and ADAPTER_VARIANTS == {"lora": LoRALinear, "dora": DoRALinear}


def test_bad_configs_raise_clear_errors():
    model = hf_model(tiny_llama_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"target_modules=\['qkv_proj'\] matched no linear module.*'q_proj'"):
        inject_adapters(model, LoraConfig(target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        inject_adapters(model, LoraConfig(r=0))
    with pytest.raises(ValueError, match="alpha must be > 0, got -1"):
        inject_adapters(model, LoraConfig(alpha=-1))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        inject_adapters(model, LoraConfig(dropout=1.0))
    with pytest.raises(ValueError, match="variant must be one of"):
        inject_adapters(model, LoraConfig(variant="vera"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed calls changed nothing
    inject_adapters(model, LoraConfig(r=2))
    with pytest.raises(RuntimeError, match="already has adapters"):
        inject_adapters(model, LoraConfig(r=2))


def test_an_adapter_on_a_tied_head_is_refused_and_on_an_untied_head_allowed():
    tied = twin(hf_model(tiny_gemma_config()))  # Gemma ties lm_head to the embeddings
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to model.embed_tokens.weight .*model.embed_tokens"):
        inject_adapters(tied, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert not any(isinstance(m, LoRALinear) for m in tied.modules())
    untied = twin(hf_model(tiny_llama_config(num_hidden_layers=1)))
    assert inject_adapters(untied, LoraConfig(r=2, target_modules=["lm_head"])) == ["lm_head"]


def test_bf16_base_keeps_fp32_adapters():
    """The adapter path runs in fp32 and the result is cast back to the base output dtype."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + layer.scale * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(y, expected.bfloat16())
