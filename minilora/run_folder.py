"""A training run's output folder: an existing run is continued only with --resume (with the same
settings and data) and replaced only with --overwrite; one process at a time trains into it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryFile
from typing import TYPE_CHECKING

from . import data as data_mod
from .prompts import load_template
from .run_state import RunError

if TYPE_CHECKING:
    from .finetune import RunConfig

try:
    import fcntl
except ImportError:  # Windows: runs into one folder are not locked against each other
    fcntl = None

LOCK_FILE = "train.lock"  # in the output folder, held by the process training into it
PATH_SETTINGS = ("model", "data", "prompt_template")  # compared on --resume as the files they name


def check_output_dir(cfg: RunConfig) -> Path:
    """Refuse to mix runs: an existing run is continued only with --resume, replaced only with --overwrite,
    and --overwrite replaces only a run (a folder with run_config.json), never other files; and refuse a
    folder that cannot be written, before anything loads. Changes nothing."""
    out = Path(cfg.output_dir)
    saved = out / "run_config.json"
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file, not a folder")
    blocking = next((parent for parent in out.absolute().parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise RunError(f"--output-dir {out} cannot be made: {blocking} is a file")
    _check_writable(out)
    if cfg.resume:
        if not saved.is_file():
            raise RunError(f"--resume: {out} holds no run (run_config.json missing)")
        try:
            previous = json.loads(saved.read_text())
        except json.JSONDecodeError as err:
            raise RunError(f"--resume: {saved} is not valid JSON ({err})") from None
        # the folder is the run whatever path reaches it; paths that name the same file are the same setting
        # the final evaluation's settings do not touch the training: they may change on a resume
        ignore = {"resume", "overwrite", "eval_baseline", "eval_limit", "eval_method", "device", "output_dir"}
        then = Path(previous.get("cwd", Path.cwd()))  # run_config.json files of older versions have no cwd
        changed = {}
        for key, value in asdict(cfg).items():
            if key not in ignore and key in previous:
                before, now = resolved_setting(key, previous[key], then), resolved_setting(key, value, Path.cwd())
                if before != now:
                    changed[key] = (before, now)
        if changed:
            raise RunError(f"--resume: settings differ from the run in {out}: "
                           + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
        # the same template path may hold another text now (edited, or read otherwise by a newer minilora)
        if previous.get("prompt_sha256") not in (None, prompt_fingerprint(cfg.prompt_template)):
            raise RunError(f"--resume: the prompt template's text differs from the one the run in {out} started "
                           f"with ({cfg.prompt_template or 'the default template'}); restore it, or start another run")
    elif _own_files_aside(out):
        if not cfg.overwrite:
            raise RunError(f"{out} already holds files (another run?); pass --resume to continue it or "
                           "--overwrite to replace it")
        if not saved.is_file():
            raise RunError(f"--overwrite replaces a training run, and {out} holds files but no run "
                           "(run_config.json missing); choose another --output-dir")
        for flag, value in (("--data", cfg.data), ("--prompt-template", cfg.prompt_template), ("--model", cfg.model)):
            if value is not None and Path(value).exists() and Path(value).resolve().is_relative_to(out.resolve()):
                raise RunError(f"--overwrite empties {out}, and {flag} {value} is inside it; move it out of the "
                               "folder or choose another --output-dir")
    return out


def prompt_fingerprint(template_file: str | None) -> str:
    """sha256 of the template text as the prompts use it (run_config.json's prompt_sha256)."""
    return hashlib.sha256(load_template(template_file).encode("utf-8")).hexdigest()


def tokens_fingerprint(formatter) -> str:
    """sha256 of what the prompts and answers tokenize to: a sample prompt, every label's tokens and the
    stop token (run_config.json's prompt_tokens_sha256). The template text alone does not tell a tokenizer
    or a minilora version that turns the same text into other tokens."""
    tokens = {"prompt": formatter.prompt_ids("x"), "labels": formatter.label_ids, "stop": formatter.stop_id}
    return hashlib.sha256(json.dumps(tokens, sort_keys=True).encode("utf-8")).hexdigest()


def check_same_tokens(out: Path, formatter) -> None:
    """--resume: the rest of the run trains on the same prompt and answer tokens as its first steps."""
    try:
        previous = json.loads((out / "run_config.json").read_text()).get("prompt_tokens_sha256")
    except (OSError, ValueError):
        return
    if previous not in (None, tokens_fingerprint(formatter)):
        raise RunError(f"--resume: the prompts or labels of the run in {out} tokenize otherwise now (another "
                       "tokenizer, prompt format or minilora version); start another run")


def check_same_data(out: Path, info: data_mod.DataInfo) -> None:
    """--resume: the rows must be the ones the run started with (same file content, same splits)."""
    try:
        previous = json.loads((out / "data_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # a run cut before it wrote data_info.json: nothing to compare with
    now = json.loads(json.dumps(asdict(info), default=str))
    changed = [key for key in ("sha256", "split_counts") if key in previous and previous[key] != now[key]]
    if changed:
        raise RunError(f"--resume: the data differs from the run in {out} ({' and '.join(changed)} changed, see "
                       f"{out / 'data_info.json'}); resume with the same --data, or start another run")


def resolved_setting(key: str, value, cwd: Path):
    """A setting as --resume compares it: a path setting that names an existing file or folder from its
    run's working directory is that file's absolute path ("runs/x" from /a and "/a/runs/x/" are one
    folder); anything else (a Hub id, a packaged name, a number) as it is."""
    if key in PATH_SETTINGS and isinstance(value, str) and (cwd / value).exists():
        return str((cwd / value).resolve())
    return value


def _check_writable(out: Path) -> None:
    """The output folder, or the nearest folder above it that exists, takes a file (a read-only mount
    would otherwise be found after the data and the model have loaded). Leaves no file behind."""
    folder = next(folder for folder in (out.absolute(), *out.absolute().parents) if folder.exists())
    try:
        with TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise RunError(f"--output-dir {out}: cannot write in {folder} ({err.strerror or err})") from None


def _own_files_aside(out: Path) -> bool:
    """Whether `out` holds anything but its lock and the temporary files of a write that a crash cut short."""
    return out.is_dir() and any(not _leftover(entry) for entry in out.iterdir())


def _leftover(entry: Path) -> bool:
    return entry.name.endswith(".tmp") or entry.name == LOCK_FILE


@contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on out/train.lock: a second process training into the same folder (a
    requeued job whose first instance still runs) would break the other's checkpoint swap."""
    if fcntl is None:
        yield
        return
    with (out / LOCK_FILE).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RunError(f"another process is training into {out} (pid {lock.read().strip() or '?'}); "
                           "let it finish or stop it first") from None
        except OSError as err:  # a file system without locks (some NFS mounts): train unlocked, as on Windows
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield  # closing the file releases the lock


def prepare_output_dir(cfg: RunConfig, held: ExitStack) -> Path:
    """check_output_dir, lock the folder for as long as `held` lasts, then empty the folder of a run that
    --overwrite replaces; called once everything the run needs has loaded, so that a mistake in the new
    settings does not cost the old run. The folder itself stays (it may be a symlink, the working
    directory, or in a parent we cannot write)."""
    out = check_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(output_lock(out))
    if not cfg.resume:
        for entry in out.iterdir():  # a replaced run's files, or leftovers of a cut write
            if (cfg.overwrite or entry.name.endswith(".tmp")) and entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return out
