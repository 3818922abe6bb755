"""Adapter files in peft's layout, both ways, and merged exports that transformers loads."""

import json

import pytest
import torch

from minilora.adapter_io import export_merged, load_adapter, read_adapter_config, save_adapter
from minilora.lora import LoRALinear, LoraConfig, adapter_parameters, inject_adapters, merge_adapters
from minilora.quant import dequantize_nf4, quantize_nf4
from tests.tiny import hf_model, tiny_gemma_config, tiny_llama_config

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
