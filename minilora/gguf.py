"""Convert a llama.cpp GGUF checkpoint into a Hugging Face style folder.

A GGUF file holds quantized weights under llama.cpp's tensor names, the model's shape as metadata
and the tokenizer's vocabulary. `convert_gguf` turns it into what the rest of minilora loads:
`config.json`, `model.safetensors` (fp32, HF parameter names), `tokenizer.json`,
`tokenizer_config.json` and `generation_config.json`.

Two things llama.cpp's converter did to the weights are undone here:
- llama: the q / k projection rows were permuted for interleaved RoPE (HF uses rotate-half);
- gemma3: every RMSNorm weight had 1 added (HF stores w zero-centred and computes x_hat * (1 + w)).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("gemma3", "llama")

# llama.cpp tensor name inside block i -> HF name inside `model.layers.{i}.`
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# The norm around the MLP: Llama's "post_attention_layernorm" is the pre-MLP norm; Gemma 3 has
# four norms per block and uses that name for the sandwich norm after attention.
_ARCH_BLOCK_NAMES = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# GPT-2's pre-tokenizer regex, and Llama 3's; "smollm" / "starcoder" split every digit first.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"default", "gpt2"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}


# ---------------------------------------------------------------------------------------- metadata
def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError) as err:  # numpy's view / reshape errors on a cut file
        raise ValueError(f"{path}: cannot read it as GGUF ({err}); is the file truncated or corrupt?") from err


def _check_convertible(meta: dict, reader: GGUFReader, path: Path) -> None:
    """Everything the conversion reads, checked before any tensor is dequantized."""
    arch = _architecture(meta, path)
    required = [f"{arch}.{key}" for key in ("embedding_length", "feed_forward_length", "block_count",
                                            "attention.head_count", "attention.layer_norm_rms_epsilon",
                                            "context_length")] + ["tokenizer.ggml.tokens", "tokenizer.ggml.model"]
    if arch == "gemma3":  # its local layers' window: no default worth guessing
        required.append("gemma3.attention.sliding_window")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {', '.join(missing)}")
    # gguf keeps its dequantizers in a private table; without it, dequantize() names the type itself
    dequantizable = getattr(gguf_quants, "_type_traits", None)
    for tensor in reader.tensors:
        try:
            hf_name(tensor.name, arch)  # e.g. Llama 3.1's rope_freqs.weight: no HF tensor to hold it
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        kind = tensor.tensor_type
        if dequantizable is not None and kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
                and kind not in dequantizable:
            raise ValueError(f"{path}: tensor {tensor.name} has type {kind.name}, which gguf cannot dequantize")


def read_metadata(reader: GGUFReader) -> dict:
    """Every metadata field of a GGUF file as plain Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _short_float(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. Recover the short value."""
    return float(str(np.float32(x)))


def _architecture(meta: dict, path: Path | str) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: general.architecture is {arch!r}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


# ------------------------------------------------------------------------------------------ config
def hf_config(meta: dict, tensor_names: list[str]) -> dict:
    """The config.json a Hugging Face checkpoint of this model has, rebuilt from GGUF metadata."""
    arch = meta["general.architecture"]
    key = lambda name: meta[f"{arch}.{name}"]  # noqa: E731
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    config = {
        "architectures": None,
        "model_type": None,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _short_float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": key("context_length"),
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    if arch == "llama":
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", mlp_bias=False)
    else:
        config.update(_gemma3_fields(meta, config))
    return config


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    """Linear RoPE scaling (Gemma 3 4B+) when the file states it; None otherwise."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise ValueError(f"{arch}.rope.scaling.type is {kind!r}; only 'linear' is supported")
    return {"rope_type": "linear", "factor": _short_float(meta[f"{arch}.rope.scaling.factor"])}


def _gemma3_fields(meta: dict, config: dict) -> dict:
    """Gemma 3 fields the GGUF does not store; llama.cpp hard-codes them the same way (llama-model.cpp)."""
    layers, pattern = config["num_hidden_layers"], 6  # every 6th layer is global
    # 27B (62 layers) scales queries by hidden / heads; all other sizes by head_dim
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": meta["gemma3.attention.sliding_window"],
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
        ],
        "_sliding_window_pattern": pattern,  # what transformers < 4.53 reads instead of layer_types
        "rope_local_base_freq": 10000.0,  # local layers; rope_theta (1e6) is the global base
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


# ----------------------------------------------------------------------------------------- weights
def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half halves).

    llama.cpp's `permute` views rows as (n_head, 2, head_dim/2) and swaps the last two axes; this
    views them as (n_head, head_dim/2, 2) and swaps them back. For k, n_head is the kv head count.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str, arch: str) -> str:
    """The HF parameter name for a GGUF tensor name, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    block_names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES[arch]}
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face name for architecture {arch!r}")


def hf_state_dict(reader: GGUFReader, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its HF name, with llama.cpp's edits undone."""
    arch = "gemma3" if config["model_type"] == "gemma3_text" else "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        # np.array copies: F32 tensors are read-only views of the memory-mapped file
        weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if arch == "llama" and name.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, kv_heads)
        elif arch == "gemma3" and tensor.name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stored 1 + w
        state[name] = weight.contiguous()
    return state


# --------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(meta: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary, special tokens and BOS rule."""
    kind = meta["tokenizer.ggml.model"]
    arch = meta["general.architecture"]
    if kind == "llama" and arch == "gemma3":
        tokenizer = _gemma_tokenizer(meta)
    elif kind == "gpt2":
        tokenizer = _byte_level_tokenizer(meta)
    else:
        raise ValueError(
            f"tokenizer.ggml.model is {kind!r} for architecture {arch!r}; supported: "
            "'llama' (sentencepiece) for gemma3, 'gpt2' (byte-level BPE) for llama"
        )
    _add_special_tokens(tokenizer, meta)
    tokens = meta["tokenizer.ggml.tokens"]
    # what encode(add_special_tokens=True) adds around the text: BOS before, EOS after, as the file says
    before = [meta["tokenizer.ggml.bos_token_id"]] if _add_bos(meta) else []
    after = [meta["tokenizer.ggml.eos_token_id"]] if meta.get("tokenizer.ggml.add_eos_token", False) else []
    if before or after:
        def wrap(text: str, type_id: int) -> str:
            return " ".join([f"{tokens[i]}:{type_id}" for i in before] + [f"{text}:{type_id}"]
                            + [f"{tokens[i]}:{type_id}" for i in after])

        tokenizer.post_processor = processors.TemplateProcessing(
            single=wrap("$A", 0),
            pair=wrap("$A", 0) + " " + wrap("$B", 1),
            special_tokens=[(tokens[i], i) for i in sorted(set(before + after))],
        )
    return tokenizer


def _add_bos(meta: dict) -> bool:
    # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama"))


def _gemma_tokenizer(meta: dict) -> Tokenizer:
    """Gemma's SentencePiece BPE with byte fallback; no prefix space; spaces become "▁".

    The file lists no merges, so they are rebuilt from the vocabulary; Gemma's merge order is the
    order the tokens appear in the file (its scores do not follow it). Tokens made only of spaces
    are stored as real spaces but looked up as "▁"s, so they are respelled first.
    """
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    rank = {token: -index for index, token in enumerate(tokens)}
    unk = meta["tokenizer.ggml.tokens"][meta.get("tokenizer.ggml.unknown_token_id", 3)]
    model = models.BPE(vocab=vocab, merges=_merges_from_vocab(vocab, rank), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _merges_from_vocab(vocab: dict[str, int], rank: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best-ranked token first.

    The same recovery transformers uses (`generate_merges`): ties broken by the pieces' lengths,
    then by their vocabulary ids.
    """
    merges = []
    for token, score in rank.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _byte_level_tokenizer(meta: dict) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with the file's merges and its pre-tokenizer split.

    "smollm" (and starcoder-like) vocabularies split every digit off before the GPT-2 regex, as
    llama.cpp and the real SmolLM2 tokenizer do; transformers' GGUF loader skips that step.
    """
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _LLAMA3_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _GPT2_PRE:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        known = sorted(_DIGIT_SPLIT_PRE | _LLAMA3_PRE | _GPT2_PRE)
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}; supported byte-level pre-tokenizers: {known}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    model = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, meta: dict) -> None:
    """Control tokens (<bos>, <|im_start|>, ...) become special; user-defined ones plain added tokens.

    Both are matched whole in the raw text, as llama.cpp does, instead of being cut into pieces.
    """
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _CONTROL]
    if meta["tokenizer.ggml.model"] == "gpt2":
        # a byte-level vocabulary spells every real token in the byte alphabet: others are mislabels
        alphabet = set(_bytes_to_unicode().values())
        control = [t for t in control if set(t.content) <= alphabet]
    tokenizer.add_special_tokens(control)
    vocab = tokenizer.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens(user)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: special token strings, the BOS / EOS rule and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    token = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": meta[f"{meta['general.architecture']}.context_length"],
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def generation_config(meta: dict, config: dict) -> dict:
    """generation_config.json: BOS / EOS / pad ids. Gemma also stops at <end_of_turn>, as its HF checkpoints do."""
    eos = [config["eos_token_id"]]
    if config["model_type"] == "gemma3_text" and "<end_of_turn>" in meta["tokenizer.ggml.tokens"]:
        eos.append(meta["tokenizer.ggml.tokens"].index("<end_of_turn>"))
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": config["pad_token_id"],
    }


# ------------------------------------------------------------------------------------------ driver
def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF file into an HF-style folder at out_dir and return out_dir.

    Writes config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json and
    generation_config.json into a temporary folder beside out_dir, then renames it into place, so
    an interrupted conversion never leaves a half-written out_dir.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    _check_convertible(meta, reader, gguf_path)
    config = hf_config(meta, [t.name for t in reader.tensors])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(hf_state_dict(reader, config), tmp / "model.safetensors", metadata={"format": "pt"})
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(meta))
        _write_json(tmp / "generation_config.json", generation_config(meta, config))
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes the folder private to its creator
            path.chmod(0o755 if path.is_dir() else 0o644)
        if is_converted(out_dir):  # another process converted it meanwhile: keep that one
            shutil.rmtree(tmp)
            return out_dir
        shutil.rmtree(out_dir, ignore_errors=True)  # an incomplete folder (not written by this code)
        try:
            tmp.rename(out_dir)
        except OSError:
            if not is_converted(out_dir):  # not a race lost to a complete conversion
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json")


def is_converted(out_dir: Path) -> bool:
    """Whether out_dir holds a whole conversion: every file, and the weights as long as their header
    says. A conversion is renamed in whole, so a gap means an outside cause (a cleanup, a full disk)."""
    if not all((out_dir / name).is_file() for name in CONVERTED_FILES):
        return False
    for name in CONVERTED_FILES:  # a JSON file cut short does not end its object (tokenizer.json: 33 MB to parse)
        if name.endswith(".json") and not _ends_an_object(out_dir / name):
            return False
    weights = out_dir / "model.safetensors"
    try:
        with weights.open("rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return weights.stat().st_size == 8 + header_size + end


def _ends_an_object(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        return f.read().rstrip().endswith(b"}")


ABANDONED_AFTER_S = 3600  # a conversion or an assembly takes about a minute: an older temporary is a killed one's


def remove_abandoned(target: Path) -> None:
    """Temporaries `.<target name>.*` of writes killed before their cleanup ran (SIGKILL, OOM): a
    conversion's folder (Gemma's is ~1 GB) or an assembled GGUF's partial file (up to 253 MB)."""
    remove_old_temporaries(target.parent.glob(f".{target.name}.*"))


def remove_old_temporaries(paths) -> None:
    """Remove the temporary files / folders among `paths` that are too old to be a running write's."""
    for leftover in paths:
        try:
            if time.time() - leftover.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        except OSError:  # removed meanwhile by another process
            pass


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
