"""Find a checkpoint (local folder, packaged short name or Hub id) and load it into `CausalLM`.

Weights are read lazily tensor by tensor from safetensors, straight into the requested dtype and
device, into a model built on the meta device: there are never two full copies in memory. A
per-layer hook (`on_layer_loaded`) lets QLoRA quantize each decoder layer as soon as it is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .model import CausalLM

# what snapshot_download fetches: config, weights (single or sharded), tokenizer and its template
HUB_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
# multimodal Gemma 3 checkpoints keep the text decoder (and an untied head) under other prefixes: the
# one rename we do
TEXT_DECODER_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                         "language_model.lm_head.": "lm_head."}
# ... and the image side, which the text decoder does not use: left unread
IMAGE_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not match the model it claims to be."""


# ----------------------------------------------------------------------------------------- resolve


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; a packaged short name (`gemma-3-270m`) converted from its GGUF once;
    otherwise a Hugging Face Hub id, from the local cache first, downloading only the needed files."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    from .packaged import resolve_packaged

    packaged = resolve_packaged(str(name_or_path))
    if packaged is not None:
        return packaged
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise CheckpointError(
            f"model {name!r}: not a local folder, not a packaged model (gemma-3-270m, smollm2-135m-instruct) "
            "and not a Hub id of the form 'org/name'"
        )
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    token = os.environ.get("HF_TOKEN")
    missing = "is not in the local Hugging Face cache"
    try:  # local cache first: no network round trip when the files are already there
        local = Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, local_files_only=True, token=token))
        lacking = _missing_files(local)
        if not lacking:
            return local
        # e.g. only config and tokenizer cached (by AutoTokenizer), or an interrupted download
        missing = f"is only partly in the local Hugging Face cache (no {', '.join(lacking[:3])})"
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or a broken cache: try the Hub
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    if offline:
        raise CheckpointError(
            f"model {repo_id!r} {missing} ({cache}) and HF_HUB_OFFLINE is set; "
            "download it where the Hub is reachable, pass a local folder, or use a packaged model "
            "(gemma-3-270m, smollm2-135m-instruct)"
        )
    try:
        fetched = Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS, token=token))
    except GatedRepoError as err:
        raise CheckpointError(
            f"model {repo_id!r} is gated: accept its licence on the Hub and set HF_TOKEN ({err.__class__.__name__})"
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(f"model {repo_id!r} was not found on the Hub (or needs HF_TOKEN)") from err
    except Exception as err:  # connection errors come in many classes
        raise CheckpointError(
            f"model {repo_id!r} {missing} ({cache}) and the Hub could not be reached "
            f"({err.__class__.__name__}: {err}); pass a local folder or a packaged model "
            "(gemma-3-270m, smollm2-135m-instruct)"
        ) from err
    lacking = _missing_files(fetched)
    if lacking and "partly" in missing:  # the cached part came back as it was: the Hub was not reached
        raise CheckpointError(
            f"model {repo_id!r} {missing} ({fetched}) and could not be completed from the Hub (unreachable, or "
            "the repository lacks them); download it where the Hub is reachable, pass a local folder, or use a "
            "packaged model (gemma-3-270m, smollm2-135m-instruct)"
        )
    if lacking:  # downloaded, and the repository has no such file (e.g. only tokenizer.model, or .bin weights)
        raise CheckpointError(
            f"model {repo_id!r}: the repository has no {', '.join(lacking[:3])}; minilora reads config.json, "
            "tokenizer.json (a fast tokenizer) and safetensors weights"
        )
    return fetched


def _missing_files(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to load: config.json, tokenizer.json, the weights (every shard)."""
    lacking = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            return lacking + [index.name]  # unreadable: fetch it again
        lacking += [shard for shard in shards if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        lacking.append("model.safetensors")
    return lacking


# ------------------------------------------------------------------------------------------ tensors


class TensorSource:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' ({err})") from err
            files = {name: folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            files = None
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        self._where: dict[str, tuple[Path, str]] = {}  # model name -> (file, name inside the file)
        for path in sorted(set(files.values())) if files else [single]:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # truncated / not a safetensors file
                raise CheckpointError(f"{path}: cannot read safetensors ({err})") from err
            self._handles[path] = handle
            for key in handle.keys():
                self._where[_strip_prefix(key)] = (path, key)

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        path, key = self._where[name]
        return tuple(self._handles[path].get_slice(key).get_shape())

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        path, key = self._where[name]
        try:
            tensor = self._handles[path].get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({err}); is the file truncated?") from err
        return tensor.to(device=device, dtype=dtype)


def _strip_prefix(key: str) -> str:
    for prefix, replacement in TEXT_DECODER_PREFIXES.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key


# -------------------------------------------------------------------------------------------- load


@dataclass
class LoadedCheckpoint:
    model: CausalLM
    folder: Path
    config: ModelConfig


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_layer_loaded: Callable[[nn.Module], None] | None = None,
) -> LoadedCheckpoint:
    """Build `CausalLM` for a checkpoint and copy its weights strictly by name.

    on_layer_loaded(layer) runs after each decoder layer's tensors are in place (QLoRA quantizes
    there, so peak memory stays near the quantized size plus one layer).
    """
    folder = resolve_checkpoint(name_or_path)
    config = ModelConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = CausalLM(config)
    source = TensorSource(folder)
    _check_keys(model, source, folder)

    def load_subtree(module: nn.Module, prefix: str) -> None:
        for sub_name, sub in module.named_modules():
            for local_name, param in list(sub.named_parameters(recurse=False)):
                name = ".".join(part for part in (prefix, sub_name, local_name) if part)
                found, expected = source.shape(name), tuple(param.shape)
                if found != expected:
                    raise CheckpointError(f"{folder}: tensor {name!r} has shape {found}, expected {expected}")
                tensor = source.get(name, dtype, device)
                sub._parameters[local_name] = nn.Parameter(tensor, requires_grad=param.requires_grad)

    load_subtree(model.model.embed_tokens, "model.embed_tokens")
    for index, layer in enumerate(model.model.layers):
        load_subtree(layer, f"model.layers.{index}")
        if on_layer_loaded is not None:
            on_layer_loaded(layer)
    load_subtree(model.model.norm, "model.norm")
    if config.tie_word_embeddings:
        model.tie_weights()  # the head is the embedding matrix, loaded under its own name
    else:
        load_subtree(model.lm_head, "lm_head")
    return LoadedCheckpoint(model=model, folder=folder, config=config)


def _check_keys(model: CausalLM, source: TensorSource, folder: Path) -> None:
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    found = {key for key in source.keys() if not key.startswith(IMAGE_PREFIXES)}
    if model.config.tie_word_embeddings:
        found.discard("lm_head.weight")  # some tied checkpoints still store a copy: ignored
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: checkpoint does not match the {model.config.model_type} model built from config.json; "
            f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )


__all__ = ["CheckpointError", "ConfigError", "LoadedCheckpoint", "load_model", "resolve_checkpoint"]
