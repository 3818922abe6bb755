"""Tiny random transformers models (the test oracle) and minilora twins holding the same weights."""

from __future__ import annotations

import torch

from minilora.config import ModelConfig
from minilora.model import CausalLM


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gemma_config(**overrides):
    from transformers import Gemma3TextConfig

    kwargs = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, sliding_window=8,
        query_pre_attn_scalar=24, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, norms included, so the (1 + w) form is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.08
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def nonzero_lora_B_(model: torch.nn.Module, std: float = 0.05) -> None:
    """Every lora_B drawn from N(0, std) with torch's global RNG: a fresh adapter's zero B would leave
    the loss, and so the gradients of A, untouched."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def hf_model(hf_config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def twin(hf) -> CausalLM:
    """A minilora model with the transformers model's weights, copied strictly by name."""
    ours = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()))
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if m != "lm_head.weight"], missing
    ours.tie_weights()
    return ours.eval()


SPECIALS = ["<pad>", "<bos>", "<eos>", "<eot>", "<unk>"]


def tiny_vocabulary(size: int) -> dict[str, int]:
    """Specials, the words of the default prompt and labels, then filler words w0, w1, ..."""
    import re

    from minilora.prompts import DEFAULT_TEMPLATE

    words = ["positive", "neutral", "negative", "\n"] + re.findall(r"\w+|[^\w\s]", DEFAULT_TEMPLATE)
    vocab: dict[str, int] = {}
    for token in SPECIALS + words:
        vocab.setdefault(token, len(vocab))
    index = 0
    while len(vocab) < size:
        vocab.setdefault(f"w{index}", len(vocab))
        index += 1
    return vocab


def write_tiny_tokenizer(folder, vocab_size: int = 128, chat_template: str | None = None) -> None:
    """A word-level tokenizer.json whose post-processor adds <bos> (ids: pad 0, bos 1, eos 2, eot 3)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors

    tok = HFTokenizer(models.WordLevel(tiny_vocabulary(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def save_tiny_checkpoint(folder, hf, **save_kwargs):
    """A complete checkpoint folder (config, safetensors, tokenizer) for a tiny transformers model."""
    hf.save_pretrained(folder, **save_kwargs)
    write_tiny_tokenizer(folder, hf.config.vocab_size)
    return folder


def ragged_batch(lengths: list[int], side: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, max length) and attention mask, each row padded on `side` to the longest."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        where = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, where], mask[i, where] = torch.randint(3, 128, (n,), generator=gen), 1
    return ids, mask


def save_tiny_multimodal_gemma(folder, tie_word_embeddings: bool = True):
    """A Gemma3ForConditionalGeneration checkpoint (text decoder + a one-layer SigLIP tower), as Gemma 3 4B+
    ship; returns the transformers model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    text = tiny_gemma_config(tie_word_embeddings=tie_word_embeddings).to_dict()
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=150, boi_token_index=151, eoi_token_index=152,
                          tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    randomize_(model)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, 160)
    return model
