"""Adapters on disk in peft's layout, and merged full checkpoints in Hugging Face's.

An adapter folder is what `peft.PeftModel.save_pretrained` writes, so either side loads the other's:

    adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, use_dora, ...
    adapter_model.safetensors  base_model.model.<module path>.lora_A.weight      (r, in)
                               base_model.model.<module path>.lora_B.weight      (out, r)
                               base_model.model.<module path>.lora_magnitude_vector  (out,)  DoRA only
                               base_model.model.<module path>.<parameter>    any other registered variant's

A registered variant other than lora / dora (minilora.lora.ADAPTER_VARIANTS) is named by the extra field
`minilora_variant`; peft cannot load such a folder as what it is. For a multimodal Gemma 3 checkpoint the
module paths are the wrapper's (`model.language_model.layers...`), as peft names them.

`export_merged` writes a plain transformers folder (config, tokenizer, model.safetensors) with the
adapters folded in and NF4 weights dequantized first, for vLLM / llama.cpp / transformers.
Every file is written to a temporary name and moved into place, so a crash leaves no half file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .adapter_config import CONFIG_NAME, VARIANT_FIELD, read_adapter_config
from .checkpoint import IMAGE_PREFIXES, TEXT_DECODER_PREFIXES
from .gguf import remove_old_temporaries
from .lora import (
    ADAPTER_VARIANTS,
    LoRALinear,
    LoraConfig,
    adapter_named_parameters,
    adapter_state_dict,
    base_weight,
    find_targets,
    inject_adapters,
    linear_module_names,
    lora_modules,
)
from .quant import NF4Linear
from .report import current_umask

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (LoraModel).model
# files a merged export copies from the source checkpoint when present
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)`, then tmp renamed to path: a cut write leaves no partial file (model-sized for an export).
    The file gets the umask's mode (safetensors creates its files owner-only), and a failure names the file."""
    _remove_abandoned_temporaries(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # as open() creates files: others sharing a runs folder read it
        os.replace(tmp, path)
    except Exception as err:  # a full disk is safetensors' SafetensorError or torch's RuntimeError
        if isinstance(err, OSError) and err.filename:
            raise
        raise OSError(f"{path}: cannot write it ({type(err).__name__}: {err}); is the disk full?") from err
    finally:
        tmp.unlink(missing_ok=True)


SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # its Rust `tempfile` names: .tmpIjBLFG


def _remove_abandoned_temporaries(folder: Path) -> None:
    """safetensors (0.8) writes through its own hidden `.tmpXXXXXX` beside the target, which a kill leaves
    behind for good (model-sized in an export's folder): remove those old enough to be nobody's write."""
    remove_old_temporaries(path for path in folder.glob(".tmp*")
                           if SAFETENSORS_TEMPORARY.fullmatch(path.name) and path.is_file())


def _write_json(path: Path, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


# ------------------------------------------------------------------------------------------ adapters


def adapter_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json peft would write for the adapters in `model`."""
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        raise ValueError("save_adapter: the model has no adapters (call inject_adapters first)")
    settings = {(m.r, m.alpha, m.use_rslora, type(m), _dropout_p(m)) for m in modules}
    if len(settings) != 1:
        # per-module ranks would need peft's rank_pattern / alpha_pattern, which minilora does not write
        raise ValueError(
            f"save_adapter: all adapters must share r, alpha, rsLoRA, variant and dropout; found {settings}"
        )
    r, alpha, use_rslora, cls, dropout = settings.pop()
    variant = _registered_name(cls)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model),
        "use_rslora": use_rslora,
        "use_dora": variant == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
        "exclude_modules": None,
        "revision": None,
    }
    if variant not in ("lora", "dora"):
        # peft cannot express a variant of minilora's own (it warns that this field is unknown, skips the extra
        # keys and loads plain LoRA); minilora's load_adapter builds the registered class again from this name
        config[VARIANT_FIELD] = variant
    return config


def _registered_name(cls: type) -> str:
    """The ADAPTER_VARIANTS key of an adapter class: what load_adapter needs to build it again."""
    names = [name for name, registered in ADAPTER_VARIANTS.items() if registered is cls]
    if not names:
        raise ValueError(
            f"save_adapter: adapter class {cls.__name__} is not in minilora.lora.ADAPTER_VARIANTS "
            f"(registered: {sorted(ADAPTER_VARIANTS)}); register it, ADAPTER_VARIANTS['<name>'] = {cls.__name__}, "
            "so that load_adapter can build it again"
        )
    return names[0]


def _target_modules(model: nn.Module) -> list[str] | str:
    """The wrapped names' suffixes (["down_proj", "q_proj", ...]) when they match nothing else; else the
    full names, so that a loader (ours or peft's suffix match) wraps exactly the trained layers again.
    For a multimodal checkpoint, a regex over its language model's names (see _language_model_regex)."""
    wrapped = [name for name, _ in lora_modules(model)]
    suffixes = {name.split(".")[-1] for name in wrapped}
    unwrapped = linear_module_names(model)  # linear layers without an adapter
    by_suffix = not any(name.split(".")[-1] in suffixes for name in unwrapped)
    if _is_multimodal(model):
        return _language_model_regex(wrapped, by_suffix)
    return sorted(suffixes) if by_suffix else sorted(wrapped)


# ------------------------------------------------------------------- multimodal checkpoints' names
# A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration, as 4B+ ship) is built here as its text
# decoder alone, under our names; peft on transformers 5 names that decoder `model.language_model.` (the head
# is `lm_head`), transformers < 4.52 `language_model.model.` (head `language_model.lm_head`). Files are written
# in the first layout and read in both.
MULTIMODAL_LAYOUT = {"model.": "model.language_model."}  # our prefix -> the wrapper's, as written
LEGACY_MULTIMODAL_LAYOUT = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def _is_multimodal(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "multimodal_wrapper", False))


def _rename(name: str, prefixes: dict[str, str]) -> str:
    """`name` with its first matching prefix replaced (compared with a trailing dot, so `lm_head` matches)."""
    dotted = name + "."
    for old, new in prefixes.items():
        if dotted.startswith(old):
            return (new + dotted[len(old):])[:-1]
    return name


def _language_model_regex(wrapped: list[str], by_suffix: bool) -> str:
    """target_modules for a multimodal checkpoint: a suffix list would also wrap the vision tower's q_proj ...
    in peft, so a regex (peft full-matches a string) over the wrapped layers' names in the wrapper."""
    decoder = sorted(name for name in wrapped if name.startswith("model."))
    others = sorted(name for name in wrapped if not name.startswith("model."))  # lm_head
    if by_suffix and decoder:
        suffixes = sorted({name.split(".")[-1] for name in decoder})
        parts = [re.escape(MULTIMODAL_LAYOUT["model."]) + r".*\.(" + "|".join(suffixes) + ")"]
    else:
        parts = [re.escape(_rename(name, MULTIMODAL_LAYOUT)) for name in decoder]
    return "|".join(parts + [re.escape(_rename(name, MULTIMODAL_LAYOUT)) for name in others])


def _from_multimodal_layout(tensors: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A multimodal checkpoint's adapter tensors under our names, and the layout their keys were in (to match
    target_modules against). Adapters on the vision tower / projector are left out: a text-only forward
    never runs them, so that is exact. Any other key is kept, to be refused if it is not expected."""
    legacy = any(key.startswith("language_model.") for key in tensors)
    ours: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(IMAGE_PREFIXES):
            continue
        name = _rename(key, TEXT_DECODER_PREFIXES)
        if name in ours:
            raise ValueError(f"{path}: two keys name {name} (one of them {key}); expected one layout of the "
                             "language model's names")
        ours[name] = value
    return ours, LEGACY_MULTIMODAL_LAYOUT if legacy else MULTIMODAL_LAYOUT


def _dropout_p(module: LoRALinear) -> float:
    return module.lora_dropout.p if isinstance(module.lora_dropout, nn.Dropout) else 0.0


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                 state: dict[str, Tensor] | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors in peft's layout; returns the folder.
    `state` (adapter_state_dict's keys) is written instead of the model's current adapter values."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = adapter_config_dict(model, base_model_name_or_path)
    for name, module in lora_modules(model):
        if module.merged:
            raise RuntimeError(f"save_adapter: {name} is merged; unmerge_adapters(model) first")
    # every adapter parameter of every variant: lora_A.weight, lora_B.weight, DoRA's lora_magnitude_vector
    # (peft's names), and whatever else a registered variant adds
    layout = MULTIMODAL_LAYOUT if _is_multimodal(model) else {}
    current = adapter_state_dict(model)
    if state is not None and set(state) != set(current):
        raise ValueError(f"save_adapter: state has other keys than the model's adapters, e.g. "
                         f"{sorted(set(state) ^ set(current))[:3]}")
    tensors = {f"{PREFIX}{_rename(key, layout)}": value.detach().cpu().contiguous()
               for key, value in (state or current).items()}
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_json(out / CONFIG_NAME, config)
    return out


def _weights_file(adapter_dir: Path) -> Path:
    """adapter_model.safetensors, or an error that says what the folder holds instead."""
    path = adapter_dir / WEIGHTS_NAME
    if path.is_file():
        return path
    if (adapter_dir / "adapter_model.bin").is_file():
        raise FileNotFoundError(
            f"{path}: not found; the folder holds adapter_model.bin (a pickle), which minilora does not read. "
            "Load it with peft and save it again: PeftModel.from_pretrained(base, folder)"
            ".save_pretrained(folder, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{path}: adapter weights not found")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(f"{path}: corrupted or truncated safetensors file ({type(e).__name__}: {e})") from e


def _module_key(key: str) -> str:
    """peft file key -> our adapter_state_dict key."""
    key = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    # peft files end in `lora_magnitude_vector` (peft's model.py keeps that format); tolerate the in-memory
    # name `lora_magnitude_vector.weight` from hand-made state dicts
    if key.endswith(".lora_magnitude_vector.weight"):
        key = key.removesuffix(".weight")
    return key


def base_model_check(expected_model: str) -> Callable[[dict], None]:
    """A `config_check` for load_adapter: refuse an adapter whose base_model_name_or_path names another
    model than `expected_model` (the same folder name counts as the same model; no name passes)."""
    def check(raw: dict) -> None:
        base = raw.get("base_model_name_or_path")
        if base and base != expected_model and _model_name(base) != _model_name(expected_model):
            raise ValueError(
                f"adapter was trained on base model {base!r}, but --model is {expected_model!r}; "
                "pass the adapter's base model"
            )

    return check


def _model_name(model: str) -> str:
    """The name that identifies a base model: its folder's name; for a packaged model's converted folder
    (`converted/<short name>-<sha12>`, packaged.py) the short name it was trained under, and for a Hub
    cache's snapshot folder the repository's name."""
    path = Path(model)
    if path.parent.name == "converted" and re.fullmatch(r".+-[0-9a-f]{12}", path.name):
        return path.name.rsplit("-", 1)[0]
    hub_cached = re.fullmatch(r"models--[^/]+--(.+)", path.parent.parent.name)  # models--org--name/snapshots/<sha>
    if path.parent.name == "snapshots" and hub_cached:
        return hub_cached.group(1)  # the name of org/name, as a Hub id is compared
    return path.name


def check_adapter_folder(adapter_dir: str | os.PathLike,
                         config_check: Callable[[dict], None] | None = None) -> tuple[LoraConfig, dict]:
    """What load_adapter checks before it needs the model: the config, `config_check` on it, and that the
    weights file is there; returns read_adapter_config's (LoraConfig, raw dict). Commands that load
    several adapters call it first, so that the last one's mistake is found before the first is evaluated."""
    config, raw = read_adapter_config(adapter_dir)
    if config_check is not None:
        config_check(raw)
    weights = _weights_file(Path(adapter_dir))
    try:  # the header and the file's length: a cut file is found here, not after the adapters before it
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise ValueError(f"{weights}: corrupted or truncated safetensors file ({type(e).__name__}: {e})") from e
    return config, raw


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    config_check: Callable[[dict], None] | None = None,
) -> list[str]:
    """Inject adapters as described by `adapter_dir`/adapter_config.json and copy in their weights.

    Works for folders written by peft or by `save_adapter`. Every key and shape is checked before the
    model is touched, so a failed load leaves it as it was. `config_check`, if given, is called with the
    raw adapter_config.json dict first (e.g. to assert `base_model_name_or_path`) and may raise.
    Returns the wrapped module names.
    """
    adapter_dir = Path(adapter_dir)
    config, _ = check_adapter_folder(adapter_dir, config_check)
    weights_path = _weights_file(adapter_dir)
    tensors = {_module_key(k): v for k, v in _read_tensors(weights_path).items()}
    rename = None
    if _is_multimodal(model):
        tensors, layout = _from_multimodal_layout(tensors, weights_path)
        rename = partial(_rename, prefixes=layout)  # target_modules name the wrapper's modules

    # expected keys and shapes, from the model as it is now and the variant's class
    try:
        targets = find_targets(model, config, rename)
    except ValueError as e:  # target_modules that match nothing here, or name a tied head
        raise ValueError(f"{adapter_dir / CONFIG_NAME}: {e}") from None
    expected = _expected_shapes(model, targets, config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        # peft adds the full weight of an adapted head / embedding (save_embedding_layers), as it would a resized one
        full_layers = [key for key in unexpected if key.endswith(("base_layer.weight", "embed_tokens.weight"))]
        hint = (f"; {full_layers[0]} is a full weight, which peft saves when an adapter targets the head or the "
                "embeddings: if the base's own weight is unchanged (no resized vocabulary), save the adapter with "
                "save_embedding_layers=False" if full_layers else "")
        raise ValueError(
            f"{weights_path}: adapter keys do not match the model "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}){hint}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, the model expects {shape} "
                "(was this adapter trained on a different base model?)"
            )

    inject_adapters(model, replace(config, target_modules=targets))  # exactly the layers checked above
    with torch.no_grad():
        for key, param in adapter_named_parameters(model):  # the keys checked above, one for one
            param.copy_(tensors[key])
    return targets


def _expected_shapes(model: nn.Module, targets: list[str], config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """{`<module>.<parameter>`: shape} of every adapter parameter `inject_adapters` will create, read off the
    variant's own class: one throwaway module per distinct layer shape, built on the meta device (no memory)."""
    cls = ADAPTER_VARIANTS[config.variant]
    per_shape: dict[tuple[int, int, bool], dict[str, tuple[int, ...]]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for name in targets:
        layer = model.get_submodule(name)
        shape = (layer.in_features, layer.out_features, getattr(layer, "bias", None) is not None)
        if shape not in per_shape:
            with torch.device("meta"):
                module = cls(nn.Linear(*shape), config.r, config.alpha, config.dropout, config.use_rslora)
            per_shape[shape] = {pname: tuple(p.shape) for pname, p in sorted(module.named_parameters())
                                if not pname.startswith("base_layer.")}  # sorted: lora_A, lora_B, the rest
        expected.update({f"{name}.{pname}": pshape for pname, pshape in per_shape[shape].items()})
    return expected


# ------------------------------------------------------------------------------------- merged export


def merged_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's weights under checkpoint names with adapters merged and NF4 dequantized.

    Computed functionally: the model itself is not changed. Tied tensors are written once (the first
    name, e.g. `model.embed_tokens.weight`; the tied `lm_head.weight` is left out, as in HF files).
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()

    def add(name: str, tensor: Tensor | None, owned: bool = True) -> None:
        if tensor is None:
            return
        if owned:  # a module's own parameter or buffer: skip it if it is tied to one already written
            if tensor.data_ptr() in seen:
                return
            seen.add(tensor.data_ptr())
        cast = dtype if tensor.is_floating_point() else tensor.dtype
        out[name] = tensor.detach().to("cpu", cast).contiguous()

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, LoRALinear):
            weight = base_weight(module.base_layer).detach().float()
            add(prefix + "weight", weight if module.merged else module.merged_weight(weight), owned=False)
            add(prefix + "bias", getattr(module.base_layer, "bias", None))
            return
        if isinstance(module, NF4Linear):
            add(prefix + "weight", module.dequantize(), owned=False)
            add(prefix + "bias", module.bias)
            return
        for name, param in module.named_parameters(recurse=False):
            add(prefix + name, param)
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                add(prefix + name, buf)
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    with torch.no_grad():
        visit("", model)
    return out


def export_merged(
    model: nn.Module,
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a transformers-loadable folder: source config / tokenizer files + merged model.safetensors.

    NF4 base weights are dequantized before the merge (the adapter was trained against them, not
    against the original bf16 weights). `dtype` is the stored dtype; config.json's dtype is updated to
    match and a quantization_config, if any, is dropped. Re-evaluate the exported model: rounding to
    `dtype` after the merge can move scores.
    """
    source, out = Path(source_dir), Path(out_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source / 'config.json'}: the source checkpoint's config.json is needed for export")
    out.mkdir(parents=True, exist_ok=True)
    tensors = merged_state_dict(model, dtype)
    _atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    for name in COPIED_FILES:
        if (source / name).is_file() and name != "config.json":
            _atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") == "gemma3":  # multimodal source: the export is its text decoder alone
        text = config.get("text_config") or {}
        config = {**text, "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                  **{key: config[key] for key in ("torch_dtype", "dtype") if key in config and key not in text}}
    config.pop("quantization_config", None)
    dtype_name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype_name
    _write_json(out / "config.json", config)  # last: a folder with a new config holds the new weights
    return out
