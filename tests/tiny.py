"""Tiny random transformers models (the test oracle) and minilora twins holding the same weights."""

from __future__ import annotations

import torch

from minilora.config import ModelConfig
from minilora.model import CausalLM


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gemma_config(**overrides):
    from transformers import Gemma3TextConfig

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
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
