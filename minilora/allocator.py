"""Which malloc the command-line process runs on.

A training step frees and reallocates hundreds of MB of activations in blocks of every size. glibc's
malloc keeps those blocks in one heap that fragments: on this task its resident memory ends up 30 %
above what is live, and it returns and re-faults pages every step. tcmalloc caches freed spans per
size instead, so resident memory stays near the live peak with no page faults (benchmarks/NOTES.md,
"Round 5": SmolLM2 selective 2.3 -> 1.77 GB peak, a few % faster). PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu`) preloads it for the same reason.

A process cannot swap its allocator once it runs, so `train.py`, `eval.py` and `minilora.predict` call
`reexec_with_preferred_malloc()` first: if tcmalloc is installed and not yet loaded, the script
restarts itself (before torch is imported) with it in LD_PRELOAD. `MINILORA_MALLOC` chooses:
"auto" (default: tcmalloc when found), "system" (never preload), or a path to a malloc library.
Nothing here is imported by the library itself; it only concerns the command-line entry points.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_CHOICE = "MINILORA_MALLOC"
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")


def library_dirs(environ: dict[str, str] | None = None) -> list[Path]:
    """Where to look, most specific first: the active virtual environment or conda prefix (where
    `.ci/fetch-tcmalloc` puts it), then the system's library folders."""
    environ = os.environ if environ is None else environ
    dirs = [Path(environ[key]) / "lib" for key in ("VIRTUAL_ENV", "CONDA_PREFIX") if environ.get(key)]
    dirs.append(Path(sys.prefix) / "lib")
    dirs += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                               "/usr/local/lib")]
    return list(dict.fromkeys(dirs))


def find_tcmalloc(dirs: list[Path] | None = None) -> Path | None:
    for folder in library_dirs() if dirs is None else dirs:
        for name in _TCMALLOC_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def preferred_malloc(environ: dict[str, str] | None = None, dirs: list[Path] | None = None) -> Path | None:
    """The library `MINILORA_MALLOC` asks for, or None for the system's malloc."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV_CHOICE, "auto").strip() or "auto"
    if choice == "system":
        return None
    if choice == "auto":
        return find_tcmalloc(dirs)
    path = Path(choice).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{ENV_CHOICE}={choice!r}: no such file (expected 'auto', 'system' or a path to a "
                                "malloc library such as libtcmalloc_minimal.so.4)")
    return path


def _preloaded_entries(environ: dict[str, str]) -> list[str]:
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()  # the loader splits on both


def is_preloaded(library: Path, environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    entries = _preloaded_entries(environ)
    return any(Path(entry).name == library.name for entry in entries)


def preloaded_malloc(environ: dict[str, str] | None = None) -> str | None:
    """A malloc the user preloads already (jemalloc, mimalloc, tcmalloc, ...): their choice stands."""
    environ = os.environ if environ is None else environ
    entries = _preloaded_entries(environ)
    return next((entry for entry in entries if "malloc" in Path(entry).name), None)


def cannot_preload(library: Path) -> str | None:
    """Why the loader would refuse `library` in LD_PRELOAD (and print errors in every child), or None."""
    if any(sep in str(library) for sep in " :"):  # LD_PRELOAD splits on both and has no quoting
        return "has a space or a colon in its path, which LD_PRELOAD cannot hold"
    try:
        with library.open("rb") as handle:
            if handle.read(4) != b"\x7fELF":
                return "is not a shared library (no ELF header)"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    return None


def with_preloaded(library: Path | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` whose processes start on `library` (unchanged for None or if already there)."""
    env = dict(os.environ if environ is None else environ)
    if library is None or is_preloaded(library, env):
        return env
    env["LD_PRELOAD"] = " ".join(filter(None, (str(library), env.get("LD_PRELOAD", ""))))
    # tcmalloc reports every allocation over 1 GB on stderr; a 262k-vocabulary model has legitimate ones
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def reexec_with_preferred_malloc() -> None:
    """Restart this script on the preferred malloc, once; returns when there is nothing to do."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return  # LD_PRELOAD is a Linux loader feature; after torch is imported a restart would cost seconds
    try:
        library = preferred_malloc()
    except FileNotFoundError as err:  # a mistyped MINILORA_MALLOC: say so, as the CLIs do for bad flags
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if library is None or is_preloaded(library):
        return
    auto = (os.environ.get(ENV_CHOICE, "auto").strip() or "auto") == "auto"
    if auto and preloaded_malloc() is not None:
        return
    reason = cannot_preload(library)
    if reason is not None:
        if not auto:  # asked for by name: as a mistyped path
            print(f"error: {ENV_CHOICE}={str(library)!r} {reason}", file=sys.stderr)
            raise SystemExit(2)
        print(f"minilora: keeping the system malloc: {library} {reason}", file=sys.stderr, flush=True)
        return
    env = with_preloaded(library)
    print(f"minilora: restarting on {library.name} (set {ENV_CHOICE}=system to keep the system malloc)",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
