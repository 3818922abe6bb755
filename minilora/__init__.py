"""minilora: LoRA / QLoRA fine-tuning of Gemma 3 and Llama-family decoders in plain PyTorch.

The pipeline, one module per step: checkpoint -> model -> adapters (lora, quant) -> data ->
prompts / loss -> trainer -> evaluate / report. What a user imports is listed here.
"""

from .adapter_io import export_merged, load_adapter, save_adapter
from .checkpoint import CheckpointError, load_model, resolve_checkpoint
from .config import ConfigError, ModelConfig
from .data import DatasetSplits, Example, load_dataset
from .evaluate import evaluate, predict
from .generate import generate
from .lora import (
    ADAPTER_VARIANTS,
    DoRALinear,
    LoraConfig,
    LoRALinear,
    adapter_parameters,
    disable_adapters,
    inject_adapters,
    merge_adapters,
    remove_adapters,
    trainable_summary,
    unmerge_adapters,
)
from .loss import completion_loss
from .metrics import classification_metrics
from .model import CausalLM, KVCache
from .packaged import PACKAGED_MODELS
from .prompts import DEFAULT_TEMPLATE, PromptFormatter
from .quant import NF4Linear, dequantize_nf4, quantize_nf4
from .scoring import label_logprobs
from .tokenizer import Tokenizer

__all__ = [
    "ADAPTER_VARIANTS", "CausalLM", "CheckpointError", "ConfigError", "DEFAULT_TEMPLATE", "DatasetSplits",
    "DoRALinear", "Example", "KVCache", "LoRALinear", "LoraConfig", "ModelConfig", "NF4Linear", "PACKAGED_MODELS",
    "PromptFormatter", "Tokenizer", "adapter_parameters", "classification_metrics", "completion_loss",
    "dequantize_nf4", "disable_adapters", "evaluate", "export_merged", "generate", "inject_adapters",
    "label_logprobs", "load_adapter", "load_dataset", "load_model", "merge_adapters", "predict", "quantize_nf4",
    "remove_adapters", "resolve_checkpoint", "save_adapter", "trainable_summary", "unmerge_adapters",
]
