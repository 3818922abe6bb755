"""A training run's checkpoint on disk: adapter (PEFT layout) + optimizer + RNG + step, written whole or
not at all, read back with the weights-only unpickler, and found again after a crash at any moment.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from .adapter_io import save_adapter
from .lora import adapter_state_dict
from .model import CausalLM

STATE_FILE = "training_state.pt"


class RunError(ValueError):
    """A run that cannot start or go on as configured (and would otherwise lose or mix up work)."""


def rng_state() -> dict:
    kind, keys, *position = np.random.get_state()
    # numpy's key array as a tensor, so that the state loads with torch's weights-only unpickler
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), *position)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *position = state["numpy"]  # keys: a tensor, or a numpy array in older checkpoints
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *position))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: CausalLM, optimizer: torch.optim.Optimizer, step: int, extra: dict,
                    base_model: str | None) -> None:
    """Adapter (PEFT layout) + optimizer + RNG + step, written to a temp folder, synced to disk and
    swapped in, so a crash or a power loss at any moment leaves the previous complete checkpoint. A
    write that fails (a full disk) leaves no temp folder and is an OSError naming the checkpoint."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, model, optimizer, step, extra, base_model)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, SafetensorError)):
            full = getattr(err, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err)
            raise OSError(f"{folder}: the checkpoint could not be written{' (disk full?)' if full else ''}: "
                          f"{err}") from err
        raise
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    _fsync_folder(folder.parent)  # the swap is on disk before the previous checkpoint goes
    shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(tmp: Path, model: CausalLM, optimizer: torch.optim.Optimizer, step: int, extra: dict,
                      base_model: str | None) -> None:
    save_adapter(model, tmp, base_model_name_or_path=base_model)
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "adapter": {k: v.clone() for k, v in adapter_state_dict(model).items()}, **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory: torch's file writer reports a full disk as "unexpected pos"
    with (tmp / STATE_FILE).open("wb") as f:
        f.write(buffer.getbuffer())
    for path in tmp.iterdir():  # a power loss after the swap must not find zero-length files
        with path.open("r+b") as f:  # Windows' FlushFileBuffers needs write access
            os.fsync(f.fileno())
    _fsync_folder(tmp)


def _fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder to sync it
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(folder: Path) -> dict:
    """A checkpoint's training state, read with torch's weights-only unpickler (tensors and plain types,
    plus the numpy arrays of checkpoints written before the numpy RNG state was saved as a tensor)."""
    path = folder / STATE_FILE
    try:
        with _numpy_of_older_checkpoints():
            state = torch.load(path, weights_only=True)
        missing = [key for key in ("step", "optimizer", "rng", "adapter", "best") if key not in state]
    except Exception as err:  # empty, cut short or garbage: a power loss or a full disk during the write
        raise RunError(f"{path} is unreadable ({_why_unreadable(path, err)}); delete {folder} and --resume "
                       "restarts the run from step 0") from None
    if missing:
        raise RunError(f"{path} holds no training state ({', '.join(missing)} missing); delete {folder} and "
                       "--resume restarts the run from step 0")
    return state


def _numpy_of_older_checkpoints():
    """The numpy types an older checkpoint's RNG state pickled, allowed for this load only (torch's
    add_safe_globals would allow them in the user's own torch.load calls too), under numpy 2's and
    numpy 1's module names: a run checkpointed under numpy 1 resumes under numpy 2."""
    reconstruct = np.array(0).__reduce__()[0]
    allowed = [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
               type(np.dtype(np.uint32))]
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        return torch.serialization.safe_globals(allowed)
    torch.serialization.add_safe_globals(allowed)
    return contextlib.nullcontext()


def _why_unreadable(path: Path, err: Exception) -> str:
    text = str(err).strip()
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if "Weights only load failed" in text:  # torch's text is a page long
        return "it holds objects other than tensors and plain values"
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def last_checkpoint_step(folder: Path) -> int | None:
    """The step of the checkpoint a --resume would continue from (also one cut in the middle of its swap);
    None when there is none or it cannot be read. Changes nothing."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            try:
                return int(load_state(candidate)["step"])
            except RunError:
                return None
    return None


def find_checkpoint(folder: Path) -> Path | None:
    """The latest complete checkpoint, always at `folder`. A crash between save_checkpoint's two
    renames leaves only the `.old` one: it moves back into place, so that no `.old` copy outlives the
    resume (a resume with nothing left to train writes no new checkpoint to clear it)."""
    old = folder.with_name(folder.name + ".old")
    if (folder / STATE_FILE).is_file():
        shutil.rmtree(old, ignore_errors=True)  # a crash after the swap, before the clean-up
        return folder
    if (old / STATE_FILE).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        old.rename(folder)
        return folder
    return None
