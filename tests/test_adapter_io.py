"""Adapter files in peft's layout, both ways, and merged exports that transformers loads."""

import json

import pytest
import torch

from minilora.adapter_io import export_merged, load_adapter, read_adapter_config, save_adapter
from minilora.lora import (
    ADAPTER_VARIANTS,
    LoRALinear,
    LoraConfig,
    adapter_parameters,
    inject_adapters,
    merge_adapters,
)
from minilora.quant import dequantize_nf4, quantize_nf4
from tests.tiny import hf_model, tiny_gemma_config, tiny_llama_config, twin

FAMILIES = {"llama": lambda: tiny_llama_config(num_hidden_layers=2), "gemma": lambda: tiny_gemma_config()}
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 17], [3, 4, 99, 12, 127, 8, 0, 64]])  # (B, T)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def perturb_(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize(
    "family,variant,rslora",
    [
        ("llama", "lora", False),
        ("gemma", "lora", False),
        ("llama", "dora", False),
        ("gemma", "dora", False),
        ("gemma", "lora", True),
    ],
)
def test_peft_round_trip_both_ways(tmp_path, family, variant, rslora):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    # ours -> peft
    ours = hf_model(FAMILIES[family]())
    inject_adapters(ours, LoraConfig(r=4, alpha=8, variant=variant, use_rslora=rslora))
    perturb_(adapter_parameters(ours))  # non-zero B
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny-random")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(TARGETS) and config["use_dora"] == (variant == "dora")
    peft_model = PeftModel.from_pretrained(hf_model(FAMILIES[family]()), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model), logits(ours), atol=1e-5, rtol=0)

    # peft -> ours
    peft_model = get_peft_model(
        hf_model(FAMILIES[family]()),
        PeftLoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, use_dora=variant == "dora", use_rslora=rslora,
            task_type="CAUSAL_LM",
        ),
    )
    perturb_([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=2)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = hf_model(FAMILIES[family]())
    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == 7 * ours.config.num_hidden_layers
    torch.testing.assert_close(logits(ours), logits(peft_model.eval()), atol=1e-5, rtol=0)


def test_an_adapter_on_some_layers_loads_back_onto_those_layers_only(tmp_path):
    from peft import PeftModel

    ours = hf_model(FAMILIES["llama"]())
    wrapped = inject_adapters(ours, LoraConfig(r=4, target_modules=r"model\.layers\.0\..*_proj"))
    perturb_(adapter_parameters(ours))
    save_adapter(ours, tmp_path / "layer0")
    config = json.loads((tmp_path / "layer0" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(wrapped)  # the suffixes would match layer 1 too

    again = hf_model(FAMILIES["llama"]())
    assert sorted(load_adapter(again, tmp_path / "layer0")) == sorted(wrapped)
    torch.testing.assert_close(logits(again), logits(ours), atol=0, rtol=0)
    peft_model = PeftModel.from_pretrained(hf_model(FAMILIES["llama"]()), tmp_path / "layer0").eval()
    assert sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and n.endswith("_proj")) == sorted(wrapped)
    torch.testing.assert_close(logits(peft_model), logits(ours), atol=1e-5, rtol=0)


def test_load_errors_are_specific(tmp_path):
    source = hf_model(tiny_llama_config(num_hidden_layers=1))
    inject_adapters(source, LoraConfig(r=4, variant="dora"))
    save_adapter(source, tmp_path / "a")

    # a base with other shapes: the first mismatching key is named with both shapes
    other = hf_model(tiny_llama_config(num_hidden_layers=1, intermediate_size=80))
    shapes = r"mlp.gate_proj.lora_B.weight has shape \(96, 4\), the model expects \(80, 4\)"
    with pytest.raises(ValueError, match=shapes):
        load_adapter(other, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # a failed load changes nothing

    deeper = hf_model(tiny_llama_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"21 missing, e.g. \['model.layers.1.mlp.down_proj.lora_A.weight'"):
        load_adapter(deeper, tmp_path / "a")  # 7 modules * (A, B, magnitude) of layer 1
    inject_adapters(deeper, LoraConfig(r=4, variant="dora"))
    save_adapter(deeper, tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"0 missing, e.g. \[\]; 21 unexpected, e.g. \['model.layers.1.mlp"):
        load_adapter(hf_model(tiny_llama_config(num_hidden_layers=1)), tmp_path / "deeper")

    def expect_base(config):  # a config_check: the adapter must name the base it is loaded into
        assert config["base_model_name_or_path"] == "google/gemma-3-270m", "wrong base"

    with pytest.raises(AssertionError, match="wrong base"):
        load_adapter(hf_model(tiny_llama_config(num_hidden_layers=1)), tmp_path / "a", config_check=expect_base)

    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=r"a/adapter_model.safetensors: corrupted or truncated safetensors"):
        load_adapter(hf_model(tiny_llama_config(num_hidden_layers=1)), tmp_path / "a")

    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type is 'IA3'; minilora loads only 'LORA' adapters"):
        load_adapter(source, tmp_path / "a")
    config_path.write_text("[]")
    with pytest.raises(ValueError, match="adapter_config.json: expected a JSON object .* found list"):
        load_adapter(source, tmp_path / "a")
    config_path.write_text(json.dumps({**config, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match=r"rank_pattern=\{'q_proj': 8\} is not supported"):
        load_adapter(source, tmp_path / "a")
    # aLoRA leaves the tokens before its invocation sequence unadapted: loaded as LoRA it would be wrong
    config_path.write_text(json.dumps({**config, "alora_invocation_tokens": [7, 8]}))
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[7, 8\] is not supported"):
        load_adapter(source, tmp_path / "a")
    config_path.write_text(json.dumps({**config, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}))
    with pytest.raises(ValueError, match=r"loftq_config=\{'loftq_bits': 4\} is not supported"):
        load_adapter(source, tmp_path / "a")
    config_path.write_text(json.dumps({**config, "use_bdlora": False, "alora_invocation_tokens": None}))
    read_adapter_config(tmp_path / "a")  # the fields as peft writes them when they are off
    config_path.write_text(json.dumps({**config, "target_modules": None}))
    with pytest.raises(ValueError, match="target_modules=None; expected a list of module names or a regex"):
        load_adapter(source, tmp_path / "a")

    config_path.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(source, tmp_path / "a")


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_export_merged_qlora_loads_in_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = hf_model(FAMILIES[family]())
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    quantize_nf4(model)
    inject_adapters(model, LoraConfig(r=4, alpha=8, variant="dora" if family == "gemma" else "lora"))
    perturb_(adapter_parameters(model))

    # a QLoRA adapter reloads onto a freshly quantized base (NF4 codes are deterministic)
    save_adapter(model, tmp_path / "adapter")
    fresh = hf_model(FAMILIES[family]())
    quantize_nf4(fresh)
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)

    out = export_merged(model, tmp_path / "src", tmp_path / "out", dtype=torch.float32)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # the reference: merge onto the dequantized NF4 weights in place
    dequantize_nf4(model)
    merge_adapters(model)
    torch.testing.assert_close(logits(loaded.eval()), logits(model), atol=1e-5, rtol=0)
    assert model.config.tie_word_embeddings == (family == "gemma")
    if model.config.tie_word_embeddings:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_export_merged_of_a_multimodal_gemma3_is_its_text_decoder(tmp_path):
    """The loader reads the text decoder out of Gemma3ForConditionalGeneration; the export must say so in its
    config, or transformers loads the merged tensors into nothing and leaves every weight random."""
    from transformers import AutoModelForCausalLM

    from minilora.checkpoint import load_model
    from tests.tiny import save_tiny_multimodal_gemma

    save_tiny_multimodal_gemma(tmp_path / "src")
    model = load_model(tmp_path / "src").model
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    perturb_(adapter_parameters(model))
    out = export_merged(model, tmp_path / "src", tmp_path / "out", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=0)


def test_a_cut_export_leaves_no_partial_file_and_no_new_config(tmp_path, monkeypatch):
    import minilora.adapter_io as adapter_io

    model = hf_model(FAMILIES["llama"]())
    model.save_pretrained(tmp_path / "src")
    inject_adapters(model, LoraConfig(r=4, alpha=8))

    def disk_full(tensors, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\0" * 1000)  # part of the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_merged(model, tmp_path / "src", tmp_path / "out", dtype=torch.float32)
    assert list((tmp_path / "out").iterdir()) == []  # no .tmp, and no config.json without its weights


def test_a_peft_adapter_on_the_head_loads_once_saved_without_the_full_head(tmp_path):
    """peft adds lm_head's full weight to the file of an adapter that targets it; minilora names that
    weight and how to leave it out, and the LoRA pair alone loads with peft's logits."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from tests.tiny import twin

    hf = hf_model(tiny_llama_config())
    ours = twin(hf)
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "with_head")
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight is a full weight.*save_embedding_layers=False"):
        load_adapter(ours, tmp_path / "with_head")
    peft_model.save_pretrained(tmp_path / "pairs_only", save_embedding_layers=False)
    load_adapter(ours, tmp_path / "pairs_only")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, peft_model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrote_the_base_is_refused_and_its_peft_conversion_loads(tmp_path, init):
    """PiSSA / OLoRA (and CorDA, LoRA-GA) subtract B A from the base weights at init, so the saved pair fits
    that residual base, not the checkpoint; peft's conversion to plain LoRA (rank 2r) fits the checkpoint."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model(FAMILIES["llama"]()), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    peft_model.peft_config["default"].init_lora_weights = True  # the initial adapter, as peft's docs save it
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = init
    perturb_([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=3)  # "training"
    peft_model.save_pretrained(tmp_path / "residual")
    with pytest.raises(ValueError, match=rf"residual/adapter_config.json: init_lora_weights='{init}' is not "
                                         r"supported.*path_initial_model_for_weight_conversion"):
        load_adapter(hf_model(FAMILIES["llama"]()), tmp_path / "residual")

    peft_model.save_pretrained(tmp_path / "converted",
                               path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = hf_model(FAMILIES["llama"]())  # the original checkpoint's weights
    load_adapter(ours, tmp_path / "converted")
    with torch.no_grad():  # peft's own model runs on the residual base: the same function
        torch.testing.assert_close(logits(ours), peft_model.eval()(input_ids=IDS).logits, atol=1e-4, rtol=0)


BAD_FIELDS = [
    ({"r": "4"}, r"field 'r' is '4'; expected a positive integer"),
    ({"r": 4.0}, r"field 'r' is 4.0; expected a positive integer"),
    ({"r": 0}, r"field 'r' is 0; expected a positive integer"),
    ({"r": True}, r"field 'r' is True; expected a positive integer"),
    ({"lora_alpha": None}, r"field 'lora_alpha' is None; expected a number > 0"),
    ({"lora_alpha": "8"}, r"field 'lora_alpha' is '8'; expected a number > 0"),
    ({"lora_alpha": 0}, r"field 'lora_alpha' is 0; expected a number > 0"),
    ({"lora_dropout": None}, r"field 'lora_dropout' is None; expected a number in \[0, 1\)"),
    ({"lora_dropout": 1.0}, r"field 'lora_dropout' is 1.0; expected a number in \[0, 1\)"),
    ({"use_dora": "false"}, r"field 'use_dora' is 'false'; expected true or false"),  # truthy: it made DoRA
    ({"use_rslora": "true"}, r"field 'use_rslora' is 'true'; expected true or false"),
    ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4' is not supported"),
    ({"init_lora_weights": "corda"}, r"init_lora_weights='corda' is not supported"),
    ({"target_modules": []}, r"target_modules=\[\]; expected a list of module names"),
    ({"target_modules": ["qkv"]}, r"target_modules=\['qkv'\] matched no linear module"),
]


@pytest.mark.parametrize("change,message", BAD_FIELDS)
def test_a_bad_config_field_is_named_with_its_file(tmp_path, change, message):
    source = hf_model(tiny_llama_config(num_hidden_layers=1))
    inject_adapters(source, LoraConfig(r=4, alpha=8))
    save_adapter(source, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'a' / 'adapter_config.json'}: {message}"):
        load_adapter(hf_model(tiny_llama_config(num_hidden_layers=1)), tmp_path / "a")


@pytest.mark.parametrize("change,expected", [
    ({"use_rslora": None, "use_dora": None}, dict(use_rslora=False, variant="lora")),  # null is off, as in peft
    ({"lora_dropout": 0}, dict(dropout=0)),
    ({"lora_alpha": 16.5}, dict(alpha=16.5)),
    ({"init_lora_weights": False}, {}),
    ({"init_lora_weights": "gaussian"}, {}),
    ({"init_lora_weights": "orthogonal"}, {}),
    ({"init_lora_weights": "eva"}, {}),
])
def test_config_values_peft_writes_are_read(tmp_path, change, expected):
    source = hf_model(tiny_llama_config(num_hidden_layers=1))
    inject_adapters(source, LoraConfig(r=4, alpha=8))
    save_adapter(source, tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    raw = {k: v for k, v in json.loads(config_path.read_text()).items() if k != "lora_dropout"}
    config_path.write_text(json.dumps({**raw, **change}))
    config, _ = read_adapter_config(tmp_path / "a")
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.dropout == change.get("lora_dropout", 0.0)  # absent is 0


def test_a_pickled_peft_adapter_is_named_with_how_to_convert_it(tmp_path):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model(FAMILIES["llama"]()), PeftLoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match=r"bin/adapter_model.safetensors: not found; the folder holds "
                                                r"adapter_model.bin .* safe_serialization=True"):
        load_adapter(hf_model(FAMILIES["llama"]()), tmp_path / "bin")


class GatedLoRALinear(LoRALinear):
    """A variant as LoRALinear's docstring describes one: LoRA times a learned scalar gate, an extra parameter."""

    def __init__(self, base_layer, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_gate = torch.nn.Parameter(torch.ones((), device=self.lora_A.weight.device))

    def adapter_output(self, x, base_result):
        return self.lora_gate * super().adapter_output(x, base_result)

    def delta_weight(self):  # merged_weight / unmerged_weight fold the gate in through it
        return self.lora_gate * super().delta_weight()


def test_a_registered_variant_saves_and_loads_every_parameter(tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setitem(ADAPTER_VARIANTS, "gated", GatedLoRALinear)
    model = hf_model(FAMILIES["llama"]())
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.0, variant="gated"))
    perturb_(adapter_parameters(model))
    opt = torch.optim.AdamW(adapter_parameters(model), lr=0.05)
    for _ in range(3):  # a few steps, so the gates move off 1
        model(IDS).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(m.lora_gate.item() != 1.0 for m in model.modules() if isinstance(m, GatedLoRALinear))
    save_adapter(model, tmp_path / "gated")

    config = json.loads((tmp_path / "gated" / "adapter_config.json").read_text())
    assert config["minilora_variant"] == "gated" and config["use_dora"] is False
    with safe_open(str(tmp_path / "gated" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_gate" in f.keys()
    fresh = hf_model(FAMILIES["llama"]())
    names = load_adapter(fresh, tmp_path / "gated")
    assert all(type(fresh.get_submodule(n)) is GatedLoRALinear for n in names)
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)

    # a file without the extra parameter is refused with the missing key named
    lora = hf_model(FAMILIES["llama"]())
    inject_adapters(lora, LoraConfig(r=4, alpha=8))
    save_adapter(lora, tmp_path / "plain")
    config_path = tmp_path / "plain" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "minilora_variant": "gated"}))
    with pytest.raises(ValueError, match=r"14 missing, e\.g\. \['model.layers.0.mlp.down_proj.lora_gate'"):
        load_adapter(hf_model(FAMILIES["llama"]()), tmp_path / "plain")

    monkeypatch.delitem(ADAPTER_VARIANTS, "gated")
    with pytest.raises(ValueError, match=r"plain/adapter_config.json: field 'minilora_variant' is 'gated'; expected "
                                         r"one of the registered variants \['dora', 'lora'\]"):
        load_adapter(hf_model(FAMILIES["llama"]()), tmp_path / "plain")
    with pytest.raises(ValueError, match=r"save_adapter: adapter class GatedLoRALinear is not in "
                                         r"minilora.lora.ADAPTER_VARIANTS"):
        save_adapter(model, tmp_path / "unregistered")


def _multimodal_pair(tmp_path):
    """A tiny Gemma3ForConditionalGeneration folder, and transformers' model of it as AutoModelForCausalLM gives it."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_multimodal_gemma

    save_tiny_multimodal_gemma(tmp_path / "src")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    return tmp_path / "src", hf.eval()


MULTIMODAL_IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))  # no image tokens


def test_an_adapter_on_a_multimodal_gemma3_loads_in_peft_on_its_language_model_only(tmp_path):
    from peft import PeftModel

    from minilora.checkpoint import load_model

    src, hf = _multimodal_pair(tmp_path)
    ours = load_model(src).model.eval()
    inject_adapters(ours, LoraConfig(r=4, alpha=8))
    perturb_(adapter_parameters(ours))
    save_adapter(ours, tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A")]
    assert len(wrapped) == 7 * 6 and all(".language_model.layers." in n for n in wrapped), wrapped
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=MULTIMODAL_IDS).logits, ours(MULTIMODAL_IDS).logits,
                                   atol=1e-5, rtol=0)
    again = load_model(src).model.eval()
    load_adapter(again, tmp_path / "adapter")  # and back into minilora
    with torch.no_grad():
        torch.testing.assert_close(again(MULTIMODAL_IDS).logits, ours(MULTIMODAL_IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("targets", [r".*language_model.*\.(q_proj|v_proj)", "all-linear"])
def test_a_peft_adapter_of_a_multimodal_gemma3_loads_into_its_text_decoder(tmp_path, targets):
    """peft names the text decoder model.language_model. (transformers < 4.52: language_model.model.), and
    "all-linear" adapts the vision tower too, whose adapters a text-only forward never runs."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from minilora.checkpoint import load_model

    src, hf = _multimodal_pair(tmp_path)
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb_([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any("vision_tower" in k for k in keys) == (targets == "all-linear")
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=MULTIMODAL_IDS).logits

    ours = load_model(src).model.eval()
    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == (2 if targets != "all-linear" else 7) * 6
    with torch.no_grad():
        torch.testing.assert_close(ours(MULTIMODAL_IDS).logits, expected, atol=1e-5, rtol=0)

    # the same file in the layout of transformers < 4.52 loads the same
    legacy = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): v
              for k, v in keys.items()}
    save_file(legacy, tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_model(src).model.eval()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(MULTIMODAL_IDS).logits, expected, atol=1e-5, rtol=0)

    # only the image side's keys are left out: another unexpected key is still refused
    save_file({**keys, "base_model.model.model.language_model.norm.lora_A.weight": torch.zeros(4, 64)},
              tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected, e.g. \['model.norm.lora_A.weight'\]"):
        load_adapter(load_model(src).model, tmp_path / "peft")


def test_a_plain_checkpoint_keeps_the_peft_layout(tmp_path):
    """Only a multimodal wrapper's files change: a text-only Gemma 3 saves suffix targets and model.layers keys."""
    from safetensors import safe_open

    model = twin(hf_model(FAMILIES["gemma"]()))
    assert not model.config.multimodal_wrapper
    inject_adapters(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys())[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_base_model_check_refuses_another_base_and_knows_a_packaged_models_converted_folder():
    from minilora.adapter_io import base_model_check

    check = base_model_check("/home/u/.cache/minilora/converted/gemma-3-270m-a5fd3b62230a")
    check({"base_model_name_or_path": "gemma-3-270m"})  # the folder the short name converts to (was refused)
    check({"base_model_name_or_path": None})  # no name: nothing to compare
    with pytest.raises(ValueError, match=r"trained on base model 'smollm2-135m-instruct', but --model is "):
        check({"base_model_name_or_path": "smollm2-135m-instruct"})
    base_model_check("google/gemma-3-1b-it")({"base_model_name_or_path": "/models/gemma-3-1b-it"})  # same folder name
    snapshot = "/root/.cache/huggingface/hub/models--google--gemma-3-1b-it/snapshots/0123abcd"
    base_model_check(snapshot)({"base_model_name_or_path": "google/gemma-3-1b-it"})  # the id's own cached files
    with pytest.raises(ValueError, match="pass the adapter's base model"):
        base_model_check("google/gemma-3-1b-it")({"base_model_name_or_path": "google/gemma-3-270m"})


def test_adapter_files_take_the_umask_mode_and_old_hidden_temporaries_go(tmp_path):
    """safetensors creates its file owner-only (0600): colleagues sharing a runs folder could not load the
    adapter. Its own hidden `.tmpXXXXXX`, left by a write that was killed, stayed for good."""
    import os
    import time

    model = hf_model(FAMILIES["llama"]())
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    (tmp_path / "a").mkdir()
    old, fresh, users = tmp_path / "a" / ".tmpKilled", tmp_path / "a" / ".tmpWrites", tmp_path / "a" / ".tmp_notes.md"
    for path in (old, fresh, users):
        path.write_bytes(b"\0" * 10)
    for path in (old, users):  # the user's own file is not safetensors' temporary, however old
        os.utime(path, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    umask = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "a")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes == {"adapter_model.safetensors": 0o644, "adapter_config.json": 0o644, ".tmpWrites": 0o644,
                     ".tmp_notes.md": 0o644}


def test_a_write_that_fails_inside_safetensors_names_the_file(tmp_path, monkeypatch):
    import minilora.adapter_io as adapter_io

    model = hf_model(FAMILIES["llama"]())
    inject_adapters(model, LoraConfig(r=4, alpha=8))

    def full(tensors, target, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")  # its wording

    monkeypatch.setattr(adapter_io, "save_file", full)
    with pytest.raises(OSError, match=r"a/adapter_model.safetensors: cannot write it \(RuntimeError: .*StorageFull"):
        save_adapter(model, tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []


def test_an_adapter_folder_check_reads_the_weights_header(tmp_path):
    """eval.py checks every --adapter before evaluating: a cut weights file was found only when its turn came."""
    from minilora.adapter_io import check_adapter_folder

    model = hf_model(FAMILIES["llama"]())
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    save_adapter(model, tmp_path / "a")
    check_adapter_folder(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"a/adapter_model.safetensors: corrupted or truncated"):
        check_adapter_folder(tmp_path / "a")
