"""Model configuration: one dataclass for both decoder families, built from a checkpoint's config.json.

The fields are named after the math they switch on, not after the model family, so the
decoder in `model.py` never asks "is this Gemma?". `ModelConfig.from_hf_dict` is the only place that
knows how Gemma 3 and Llama configs spell things, and it refuses anything it does not implement.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("gemma3_text", "gemma3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' Gemma3TextConfig defaults (those of Gemma 3 4B) that a config.json may leave out and that
# the readers below have no Gemma default for (head_dim, the window, the scalar... are defaulted there)
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}
WRAPPER_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")


class ConfigError(ValueError):
    """A config.json we cannot turn into a correct model."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding for one kind of layer."""

    theta: float  # base wavelength
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0  # linear / llama3 scaling factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; each flag is named after the numerics it enables."""

    model_type: str  # as in config.json; informative only, the flags below decide the math
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int  # not always hidden_size // num_heads (Gemma 3)
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    mlp_activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    rope_global: RopeConfig  # RoPE of full-attention layers
    rope_local: RopeConfig  # RoPE of sliding-window layers (same as global when there are none)
    layer_types: tuple[str, ...]  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None  # key j visible from query i iff i - window < j <= i
    attention_scale: float | None = None  # None -> head_dim ** -0.5
    norm_unit_offset: bool = False  # RMSNorm computes x_hat * (1 + w) in fp32 (Gemma) vs w * x_hat
    embed_scale: float = 1.0  # embeddings multiplied by this (sqrt(hidden) for Gemma)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE
    sandwich_norms: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    attention_bias: bool = False  # bias on q/k/v/o projections
    mlp_bias: bool = False  # bias on gate/up/down projections
    attn_logit_softcap: float | None = None  # tanh soft-capping of attention scores
    final_logit_softcap: float | None = None  # tanh soft-capping of the LM head output
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    # config.json was a multimodal wrapper's (Gemma3ForConditionalGeneration, model_type gemma3): only its text
    # decoder is built, but peft names its modules as the wrapper does (adapter_io maps the names)
    multimodal_wrapper: bool = False

    @property
    def is_gemma(self) -> bool:
        return self.model_type.startswith("gemma")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found (expected a Hugging Face checkpoint folder)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Translate a Hugging Face config dict; raise ConfigError on anything not implemented."""
        model_type = raw.get("model_type")
        multimodal = model_type == "gemma3"
        if multimodal:  # multimodal wrapper: we train the text decoder only
            # the wrapper's token ids and tying hold for its text model where text_config is silent
            inherited = {key: raw[key] for key in WRAPPER_FIELDS if raw.get(key) is not None}
            raw = {**inherited, **(raw.get("text_config") or {}), "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type == "gemma3_text":
            # files written by transformers 4.50 (Gemma 3 4B and up) leave out the fields that equal
            # Gemma3TextConfig's defaults: the heads, the vocabulary, head_dim
            raw = {**GEMMA3_TEXT_DEFAULTS, **{key: value for key, value in raw.items() if value is not None}}
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Gemma 3 text and Llama-family decoders)"
            )
        reader = _Reader(raw, source)
        config = _llama_config(reader) if model_type == "llama" else _gemma3_config(reader)
        return replace(config, multimodal_wrapper=multimodal)


class _Reader:
    """Reads fields of one config dict, naming the file and field in every error."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key, default)
        return default if value is None else value

    def require(self, key: str) -> Any:
        if self.raw.get(key) is None:
            raise ConfigError(f"{self.source}: required field {key!r} is missing")
        return self.raw[key]

    def number(self, kind: type, key: str, default: Any = None) -> Any:
        """int / float of a field (required when default is None), or a ConfigError naming it."""
        value = self.require(key) if default is None else self.get(key, default)
        try:
            if isinstance(value, bool) or kind is int and float(value) != int(float(value)):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.source}: field {key!r} is {value!r}, expected "
                              f"{'an integer' if kind is int else 'a number'}") from None

    def refuse_unless(self, key: str, allowed: tuple, why: str) -> None:
        value = self.raw.get(key)
        if value not in allowed:
            raise ConfigError(f"{self.source}: {key}={value!r} is not implemented ({why}); expected one of {allowed}")

    def eos_ids(self) -> tuple[int, ...]:
        eos = self.raw.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope_from_dict(params: dict[str, Any] | None, theta: float, source: str, max_positions: int) -> RopeConfig:
    if not params:
        return RopeConfig(theta=float(theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not implemented; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(params.get("rope_theta", theta)),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        # transformers' default when a scaled type leaves it out: the model's own context length
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_positions)),
    )


def _shared_fields(r: _Reader, max_positions: int, tied: bool) -> dict[str, Any]:
    """Fields both families spell the same way; the arguments are the family's defaults."""
    heads = r.number(int, "num_attention_heads")
    kv_heads = r.number(int, "num_key_value_heads", heads)
    if kv_heads < 1 or heads % kv_heads:
        raise ConfigError(f"{r.source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                          f"{kv_heads} (each key / value head serves a whole group of query heads)")
    return dict(
        vocab_size=r.number(int, "vocab_size"),
        hidden_size=r.number(int, "hidden_size"),
        intermediate_size=r.number(int, "intermediate_size"),
        num_layers=r.number(int, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=r.number(float, "rms_norm_eps", 1e-6),
        max_position_embeddings=r.number(int, "max_position_embeddings", max_positions),
        tie_word_embeddings=bool(r.get("tie_word_embeddings", tied)),
        attention_bias=bool(r.get("attention_bias", False)),
        bos_token_id=r.raw.get("bos_token_id"),
        eos_token_ids=r.eos_ids(),
        pad_token_id=r.raw.get("pad_token_id"),
    )


def _llama_config(r: _Reader) -> ModelConfig:
    r.refuse_unless("hidden_act", (None, "silu"), "Llama MLP is SwiGLU")
    shared = _shared_fields(r, max_positions=2048, tied=False)
    # transformers 5 writes rope_parameters (with rope_theta inside); older files rope_theta + rope_scaling
    # with both, the legacy rope_scaling wins, as transformers reads such a file
    rope_params = r.raw.get("rope_scaling") or r.raw.get("rope_parameters")
    rope = _rope_from_dict(rope_params, r.get("rope_theta", 10000.0), r.source, shared["max_position_embeddings"])
    return ModelConfig(
        model_type="llama",
        **shared,
        head_dim=r.number(int, "head_dim", shared["hidden_size"] // shared["num_heads"]),
        mlp_activation="silu",
        rope_global=rope,
        rope_local=rope,
        layer_types=("full_attention",) * shared["num_layers"],
        mlp_bias=bool(r.get("mlp_bias", False)),
    )


def _gemma3_layer_types(r: _Reader, layers: int) -> tuple[str, ...]:
    if r.raw.get("layer_types"):
        types = tuple(r.raw["layer_types"])
        if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(
                f"{r.source}: layer_types must list {layers} entries of 'sliding_attention' / 'full_attention'"
            )
        return types
    pattern = r.number(int, "sliding_window_pattern", r.get("_sliding_window_pattern", 6))
    # every pattern-th layer is global: layers 5, 11, ... for the default pattern of 6
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers))


def _gemma3_config(r: _Reader) -> ModelConfig:
    r.refuse_unless("hidden_activation", (None, "gelu_pytorch_tanh"), "Gemma 3 MLP is GeGLU with tanh GELU")
    if r.raw.get("use_bidirectional_attention"):
        raise ConfigError(f"{r.source}: use_bidirectional_attention=true is not implemented (causal decoders only)")
    shared = _shared_fields(r, max_positions=131072, tied=True)
    head_dim = r.number(int, "head_dim", 256)
    params, legacy = r.raw.get("rope_parameters"), r.raw.get("rope_scaling")
    max_positions = shared["max_position_embeddings"]
    if params and "full_attention" in params:  # transformers 5 layout: one dict per layer type
        # a legacy rope_scaling next to it is merged into the global layers' dict, as transformers does
        full = {**(params["full_attention"] or {}), **(legacy or {})}
        rope_global = _rope_from_dict(full, 1_000_000.0, r.source, max_positions)
        rope_local = _rope_from_dict(params.get("sliding_attention"), 10_000.0, r.source, max_positions)
    else:  # checkpoint layout: rope_theta (+ rope_scaling) global, rope_local_base_freq local, unscaled
        rope_global = _rope_from_dict(legacy or params, r.get("rope_theta", 1_000_000.0), r.source, max_positions)
        rope_local = RopeConfig(theta=r.number(float, "rope_local_base_freq", 10_000.0))
    return ModelConfig(
        model_type="gemma3_text",
        **shared,
        head_dim=head_dim,
        mlp_activation="gelu_tanh",
        rope_global=rope_global,
        rope_local=rope_local,
        layer_types=_gemma3_layer_types(r, shared["num_layers"]),
        sliding_window=r.number(int, "sliding_window", 4096),
        attention_scale=r.number(float, "query_pre_attn_scalar", 256) ** -0.5,  # transformers' default, not head_dim
        norm_unit_offset=True,
        embed_scale=math.sqrt(shared["hidden_size"]),
        qk_norm=True,
        sandwich_norms=True,
        attn_logit_softcap=r.raw.get("attn_logit_softcapping"),
        final_logit_softcap=r.raw.get("final_logit_softcapping"),
    )
