"""Loading checkpoints: local folders (single and sharded), the Hub cache offline, and clear errors."""

import copy
import json
import shutil

import pytest
import torch

from minilora.checkpoint import CheckpointError, load_model, resolve_checkpoint
from minilora.config import ConfigError
from minilora.tokenizer import Tokenizer
from tests.tiny import hf_model, save_tiny_checkpoint as save_tiny, tiny_gemma_config, tiny_llama_config, write_tiny_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf = hf_model(tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return save_tiny(tmp_path_factory.mktemp("llama"), hf), hf


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("sharded", [False, True])
def test_local_folder_loads_to_transformers_logits(tmp_path, family, sharded):
    config = tiny_llama_config() if family == "llama" else tiny_gemma_config()
    hf = hf_model(config)
    save_tiny(tmp_path, hf, **({"max_shard_size": "40KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model = load_model(tmp_path).model
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - hf(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_dtype_is_a_parameter(llama_dir):
    folder, _ = llama_dir
    model = load_model(folder, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_per_layer_hook_sees_each_loaded_layer(llama_dir):
    folder, _ = llama_dir
    seen = []
    load_model(folder, on_layer_loaded=lambda layer: seen.append(layer.self_attn.q_proj.weight.is_meta))
    assert seen == [False, False, False]


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_missing_config_is_a_clear_error(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(folder)


def test_unknown_model_type_names_supported_ones(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'gpt_neox' is not supported; supported: gemma3_text, gemma3, llama"):
        load_model(folder)


def test_unimplemented_config_field_is_refused(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope type 'yarn' is not implemented"):
        load_model(folder)


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_model(folder)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: \['model.layers.0.extra.weight'\]"):
        load_model(folder)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.2.self_attn.k_proj.weight' has shape \(8, 64\), expected \(32, 64\)"):
        load_model(folder)


def test_truncated_safetensors_is_named(llama_dir, tmp_path):
    folder = _copy(llama_dir[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load_model(folder)


def _fake_hub_cache(cache, repo_id, source):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_id_loads_from_local_cache_when_offline(llama_dir, tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", llama_dir[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_checkpoint("tiny-org/tiny-llama") == snapshot
    assert load_model("tiny-org/tiny-llama").config.num_layers == 3


def test_hub_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_checkpoint("google/gemma-3-1b-it")


def test_a_partly_cached_hub_id_is_completed_from_the_hub_or_named_offline(llama_dir, tmp_path, monkeypatch):
    """AutoTokenizer / AutoConfig cache only config and tokenizer: that snapshot is not a checkpoint."""
    import huggingface_hub
    import huggingface_hub.constants as constants

    snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", llama_dir[0])
    (snapshot / "model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"only partly in the local Hugging Face cache \(no model.safetensors\)"):
        resolve_checkpoint("tiny-org/tiny-llama")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def download(repo_id, local_files_only=False, **kwargs):  # the Hub, faked: it completes the snapshot
        calls.append(local_files_only)
        if not local_files_only:
            shutil.copy(llama_dir[0] / "model.safetensors", snapshot / "model.safetensors")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_checkpoint("tiny-org/tiny-llama") == snapshot
    assert calls == [True, False]  # the cache first, then the Hub for what it lacked
    assert load_model("tiny-org/tiny-llama").config.num_layers == 3

    # the Hub unreachable and HF_HUB_OFFLINE unset: snapshot_download hands back the cached part as it is
    (snapshot / "model.safetensors").unlink()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(snapshot))
    with pytest.raises(CheckpointError, match=r"only partly in the local Hugging Face cache \(no "
                                              r"model.safetensors\) .* and could not be completed from the Hub"):
        resolve_checkpoint("tiny-org/tiny-llama")  # was "<snapshot>: no model.safetensors" at load time

    # nothing cached, the Hub reached, and the repository has no fast tokenizer: not a cache problem
    shutil.rmtree(tmp_path / "hub")
    fetched = tmp_path / "fetched"
    shutil.copytree(llama_dir[0], fetched)
    (fetched / "tokenizer.json").unlink()
    def hub_without_tokenizer_json(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise FileNotFoundError("not cached")  # as LocalEntryNotFoundError
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_without_tokenizer_json)
    with pytest.raises(CheckpointError, match=r"'tiny-org/tiny-llama': the repository has no tokenizer.json; "
                                              r"minilora reads config.json, tokenizer.json \(a fast tokenizer\)"):
        resolve_checkpoint("tiny-org/tiny-llama")


@pytest.mark.parametrize("tied", [True, False])
def test_a_multimodal_gemma3_checkpoint_loads_its_text_decoder(tmp_path, tied):
    """Gemma 3 4B+ ship as Gemma3ForConditionalGeneration: the text decoder under another prefix (an
    untied head too), plus a vision tower and projector that text fine-tuning does not read."""
    from tests.tiny import save_tiny_multimodal_gemma

    reference = save_tiny_multimodal_gemma(tmp_path, tie_word_embeddings=tied)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = load_model(tmp_path).model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_sparse_gemma3_config_reads_as_transformers_reads_it():
    """transformers 4.50 wrote Gemma 3 4B's config.json with only the fields that differ from
    Gemma3TextConfig's defaults (this is that file's text part), and the wrapper's eos ids."""
    from transformers import AutoConfig

    from minilora.config import ModelConfig

    raw = {"model_type": "gemma3", "eos_token_id": [1, 106],
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    reference = AutoConfig.for_model(**copy.deepcopy(raw)).text_config
    ours = ModelConfig.from_hf_dict(raw)
    for field, theirs in (("vocab_size", "vocab_size"), ("num_heads", "num_attention_heads"),
                          ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                          ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                          ("sliding_window", "sliding_window"), ("layer_types", "layer_types")):
        assert getattr(ours, field) == (tuple(getattr(reference, theirs)) if field == "layer_types"
                                        else getattr(reference, theirs)), field
    assert ours.attention_scale == reference.query_pre_attn_scalar ** -0.5 and ours.eos_token_ids == (1, 106)
    assert (ours.rope_global.rope_type, ours.rope_global.factor) == ("linear", 8.0)


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", "four", "field 'num_attention_heads' is 'four', expected an integer"),
    ("rms_norm_eps", [1e-6], r"field 'rms_norm_eps' is \[1e-06\], expected a number"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
])
def test_a_config_field_of_the_wrong_kind_is_named(field, value, message):
    from minilora.config import ModelConfig

    raw = {**tiny_llama_config(num_attention_heads=4, num_key_value_heads=2).to_dict(), field: value}
    with pytest.raises(ConfigError, match=f"the/config.json: {message}"):
        ModelConfig.from_hf_dict(raw, source="the/config.json")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="not a local folder, not a packaged model"):
        resolve_checkpoint("no-such-model")


def test_tokenizer_special_tokens_and_bos(llama_dir):
    tok = Tokenizer(llama_dir[0])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.adds_bos
    ids = tok.encode("w5 w6", add_special_tokens=False)
    assert len(ids) == 2 and tok.encode("w5 w6") == [1] + ids


def test_chat_template_renders_and_finds_end_of_turn(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eot> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    write_tiny_tokenizer(tmp_path, chat_template=template)
    tok = Tokenizer(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "w9"}])
    assert text == "<bos><user> w9 <eot> <assistant> "
    assert tok.end_of_turn_id() == 3


@pytest.mark.parametrize("template", [
    # tojson (as Qwen / Llama 3 tool templates use it), non-ASCII content included
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] | tojson }} <eot> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}",
    # loop controls and a special token other than bos / eos
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }} <eot> {{ pad_token }}{% if loop.index > 5 %}{% break %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}",
    # TRL's assistant-mask markers, and a template that tests tools / documents (None when there are none)
    "{% if tools is not none %}Tools: {% for t in tools %}{{ t }}{% endfor %}{% endif %}"
    "{% if documents is not none %}Docs: {{ documents | tojson }}{% endif %}{% for m in messages %}"
    "<{{ m['role'] }}> {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <eot>{% endgeneration %}"
    "{% else %}{{ m['content'] }} <eot>{% endif %} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}",
])
def test_chat_templates_render_as_transformers_renders_them(tmp_path, template):
    from transformers import PreTrainedTokenizerFast

    write_tiny_tokenizer(tmp_path, chat_template=template)
    ours, reference = Tokenizer(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w9 caf\u00e9 \U0001f600"}]
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
            reference.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    # <eot>, also under tojson, where the quote closing the JSON string comes first
    assert ours.end_of_turn_id() == 3


def test_a_chat_template_jinja_file_wins_over_the_config_entry_as_in_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    write_tiny_tokenizer(tmp_path, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eot> "
                                                  "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")
    messages = [{"role": "user", "content": "w9"}]
    expected = PreTrainedTokenizerFast.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False,
                                                                                     add_generation_prompt=True)
    assert Tokenizer(tmp_path).apply_chat_template(messages) == expected == "<user> w9 <eot> <assistant> "


def test_newline_ids_hold_byte_levels_newline_but_not_the_letter_of_another_vocabulary(tmp_path):
    import json

    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    def newline_ids(byte_level: bool) -> set[str]:
        tok = HFTokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "Ċ": 2, "a\n": 3, "a": 4}, unk_token="<unk>"))
        if byte_level:
            tok.decoder = decoders.ByteLevel()
        tok.save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
        ours = Tokenizer(tmp_path)
        return {ours.token(i) for i in ours.newline_ids}

    assert newline_ids(byte_level=True) == {"Ċ", "a\n"}  # 'Ċ' is byte-level's newline
    assert newline_ids(byte_level=False) == {"a\n"}  # Gemma's 'Ċ' is a letter: generation must not stop at it


def test_a_broken_chat_template_is_a_tokenizer_error_naming_the_folder(tmp_path):
    from minilora.tokenizer import TokenizerError

    write_tiny_tokenizer(tmp_path, chat_template="{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}")
    with pytest.raises(TokenizerError, match=f"chat template of {tmp_path}: TypeError"):  # was a bare TypeError
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "w9"}])

    write_tiny_tokenizer(tmp_path, chat_template="{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(TokenizerError, match=f"chat template of {tmp_path}: TemplateSyntaxError"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "w9"}])
    write_tiny_tokenizer(tmp_path, chat_template="{% for m in messages %}{{ m['content'][:2] }}<eot>{% endfor %}")
    with pytest.raises(TokenizerError, match="does not appear verbatim"):
        Tokenizer(tmp_path).end_of_turn_id()


def test_a_gemma_config_without_query_pre_attn_scalar_scales_as_transformers_does(tmp_path):
    """transformers defaults the scalar to 256, whatever head_dim is (the tiny model's is 32)."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path, hf_model(tiny_gemma_config()))
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("query_pre_attn_scalar") != 256 and config["head_dim"] != 256
    (folder / "config.json").write_text(json.dumps(config))
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        got = load_model(folder).model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_an_unreadable_tokenizer_json_is_named(tmp_path):
    from minilora.tokenizer import TokenizerError

    write_tiny_tokenizer(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(TokenizerError, match=rf"{path}: cannot be read as a tokenizer \(EOF while parsing"):
        Tokenizer(tmp_path)  # was a bare Exception naming no file
