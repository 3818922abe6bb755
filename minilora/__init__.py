"""minilora: LoRA / QLoRA fine-tuning of Gemma 3 and Llama-family decoders in plain PyTorch.

The pipeline, one module per step: checkpoint -> model -> adapters (lora, quant) -> data ->
prompts / loss -> trainer -> evaluate / report. What a user imports is listed here.

Each name is imported from its module on first use (PEP 562): `import minilora` itself loads no
torch, so `train.py` can still choose the process's malloc before torch starts (see `allocator.py`).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

_EXPORTS_BY_MODULE = {
    "adapter_io": ("export_merged", "load_adapter", "save_adapter"),
    "checkpoint": ("CheckpointError", "load_model", "resolve_checkpoint"),
    "config": ("ConfigError", "ModelConfig"),
    "data": ("DatasetSplits", "Example", "load_dataset"),
    "evaluate": ("evaluate", "predict"),
    "generate": ("generate",),
    "lora": ("ADAPTER_VARIANTS", "DoRALinear", "LoraConfig", "LoRALinear", "adapter_parameters", "disable_adapters",
             "inject_adapters", "merge_adapters", "remove_adapters", "trainable_summary", "unmerge_adapters"),
    "loss": ("completion_loss",),
    "metrics": ("classification_metrics",),
    "model": ("CausalLM", "KVCache"),
    "packaged": ("PACKAGED_MODELS",),
    "prompts": ("DEFAULT_TEMPLATE", "PromptFormatter"),
    "quant": ("NF4Linear", "dequantize_nf4", "quantize_nf4"),
    "scoring": ("label_logprobs",),
    "tokenizer": ("Tokenizer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS_BY_MODULE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'minilora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps each public name over a submodule of the same name (`evaluate`, `generate`, `predict`):
    the import system binds a submodule on its package when the submodule first loads, which would
    hide the function once any code has imported, say, `minilora.generate`."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _MODULE_OF:
            return  # the submodule stays in sys.modules["minilora.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from .adapter_io import export_merged, load_adapter, save_adapter
    from .checkpoint import CheckpointError, load_model, resolve_checkpoint
    from .config import ConfigError, ModelConfig
    from .data import DatasetSplits, Example, load_dataset
    from .evaluate import evaluate, predict
    from .generate import generate
    from .lora import (ADAPTER_VARIANTS, DoRALinear, LoraConfig, LoRALinear, adapter_parameters, disable_adapters,
                       inject_adapters, merge_adapters, remove_adapters, trainable_summary, unmerge_adapters)
    from .loss import completion_loss
    from .metrics import classification_metrics
    from .model import CausalLM, KVCache
    from .packaged import PACKAGED_MODELS
    from .prompts import DEFAULT_TEMPLATE, PromptFormatter
    from .quant import NF4Linear, dequantize_nf4, quantize_nf4
    from .scoring import label_logprobs
    from .tokenizer import Tokenizer
