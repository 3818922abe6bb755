"""adapter_config.json as peft writes it, read and checked: what minilora implements, and a clear
refusal (file, field, what was expected) for every option whose adapter would run differently here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from .lora import ADAPTER_VARIANTS, LoraConfig, check_lora_config

CONFIG_NAME = "adapter_config.json"
# adapter_config.json field naming a registered variant other than lora / dora (peft has no such field)
VARIANT_FIELD = "minilora_variant"


# peft options minilora does not implement, with the value that means "off"
_UNSUPPORTED_OFF = {
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "exclude_modules": None,
    "layer_replication": None,
    # peft variants whose forward is not plain LoRA / DoRA (aLoRA adapts only from its invocation tokens on)
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    # LoftQ adapters pair with the base weights LoftQ rewrote, not with the original checkpoint
    "loftq_config": {},
}


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """Parse and check an adapter_config.json (ours or peft's): (LoraConfig, the raw dict)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        inner = Path(adapter_dir) / "adapter"
        hint = (f"it holds a training run: pass {inner}" if (inner / CONFIG_NAME).is_file()
                else f"is {adapter_dir} a peft / minilora adapter folder?")
        raise FileNotFoundError(f"{path}: adapter_config.json not found ({hint})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with peft's adapter fields, found {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}; minilora loads only 'LORA' adapters")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in raw]
    if missing:
        raise ValueError(f"{path}: required field(s) {missing} missing")
    for key, off in _UNSUPPORTED_OFF.items():
        value = raw.get(key, off)
        if value != off and not (off in (None, False, {}) and value in (None, False, [], {})):
            raise ValueError(f"{path}: {key}={value!r} is not supported by minilora (expected {off!r})")
    _refuse_residual_init(path, raw)
    targets = raw["target_modules"]
    names = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (isinstance(targets, str) or names):
        raise ValueError(f"{path}: target_modules={targets!r}; expected a list of module names or a regex string")
    config = LoraConfig(
        r=_rank(path, raw),
        alpha=_number(path, raw, "lora_alpha", "a number > 0", lambda v: v > 0),
        dropout=_number(path, raw, "lora_dropout", "a number in [0, 1)", lambda v: 0 <= v < 1, default=0.0),
        target_modules=targets,
        use_rslora=_flag(path, raw, "use_rslora"),
        variant=_variant_name(path, raw),
    )
    try:
        check_lora_config(config)  # what inject_adapters would refuse, found before the model is touched
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config, raw


# init_lora_weights values (prefixes) whose init rewrote the base weights (W -> W - B A at init): such an
# adapter pairs with that residual base, not with the checkpoint, and onto the checkpoint gives other outputs
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")


def _refuse_residual_init(path: Path, raw: dict) -> None:
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise ValueError(
            f"{path}: init_lora_weights={init!r} is not supported: this adapter pairs with the base weights its "
            "init rewrote, not with the original checkpoint (expected True, False, 'gaussian', 'orthogonal', "
            "'eva', ...); peft converts it to a plain LoRA adapter: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before training>)"
        )


def _rank(path: Path, raw: dict) -> int:
    r = raw["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: field 'r' is {r!r}; expected a positive integer (the adapter rank)")
    return r


def _number(path: Path, raw: dict, key: str, wanted: str, ok: Callable[[float], bool],
            default: float | None = None) -> float:
    """A numeric field (`default` when absent), or an error naming the file, field and what was expected."""
    value = raw.get(key, default)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (is_number and ok(value)):
        raise ValueError(f"{path}: field {key!r} is {value!r}; expected {wanted}")
    return value


def _flag(path: Path, raw: dict, key: str) -> bool:
    """A true / false field; absent or null is false, as peft reads it. A string ("false") is refused:
    it would be truthy."""
    value = raw.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{path}: field {key!r} is {value!r}; expected true or false")
    return value


def _variant_name(path: Path, raw: dict) -> str:
    """The ADAPTER_VARIANTS key: `minilora_variant` if written (variants peft cannot express), else
    peft's use_dora."""
    use_dora = _flag(path, raw, "use_dora")
    name = raw.get(VARIANT_FIELD)
    if name is None:
        return "dora" if use_dora else "lora"
    if not isinstance(name, str) or name not in ADAPTER_VARIANTS:
        raise ValueError(f"{path}: field {VARIANT_FIELD!r} is {name!r}; expected one of the registered "
                         f"variants {sorted(ADAPTER_VARIANTS)} (minilora.lora.ADAPTER_VARIANTS)")
    if use_dora and name != "dora":
        raise ValueError(f"{path}: use_dora is true but {VARIANT_FIELD} is {name!r}; expected one of them only")
    return name
