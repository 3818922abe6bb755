"""The command-line scripts' malloc choice (minilora/allocator.py): where tcmalloc is looked for, what
MINILORA_MALLOC selects, and the one restart with LD_PRELOAD that a real process goes through."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minilora.allocator import (ENV_CHOICE, cannot_preload, find_tcmalloc, is_preloaded, library_dirs,
                                preferred_malloc, preloaded_malloc, with_preloaded)

REPO = Path(__file__).resolve().parents[1]


def _fake_library(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\x7fELF")
    return folder / name


def test_library_dirs_put_the_virtual_environment_first(tmp_path):
    dirs = library_dirs({"VIRTUAL_ENV": str(tmp_path / "venv"), "CONDA_PREFIX": str(tmp_path / "conda")})
    assert dirs[:2] == [tmp_path / "venv" / "lib", tmp_path / "conda" / "lib"]
    assert Path("/usr/lib/x86_64-linux-gnu") in dirs
    assert len(dirs) == len(set(dirs))


def test_find_tcmalloc_takes_the_first_folder_that_has_one(tmp_path):
    empty, first, second = tmp_path / "empty", tmp_path / "first", tmp_path / "second"
    empty.mkdir()
    assert find_tcmalloc([empty]) is None
    found = _fake_library(first, "libtcmalloc.so.4")
    _fake_library(second, "libtcmalloc_minimal.so.4")
    assert find_tcmalloc([empty, first, second]) == found
    # within a folder the minimal build (no heap profiler) is preferred
    minimal = _fake_library(first, "libtcmalloc_minimal.so.4")
    assert find_tcmalloc([first]) == minimal


def test_minilora_malloc_selects_auto_system_or_a_path(tmp_path):
    library = _fake_library(tmp_path / "lib", "libtcmalloc_minimal.so.4")
    assert preferred_malloc({}, [tmp_path / "lib"]) == library  # auto is the default
    assert preferred_malloc({ENV_CHOICE: "auto"}, [tmp_path]) is None  # auto, nothing installed
    assert preferred_malloc({ENV_CHOICE: "system"}, [tmp_path / "lib"]) is None
    other = _fake_library(tmp_path / "elsewhere", "libjemalloc.so.2")
    assert preferred_malloc({ENV_CHOICE: str(other)}, []) == other
    with pytest.raises(FileNotFoundError, match=f"{ENV_CHOICE}=.*no such file.*'auto', 'system'"):
        preferred_malloc({ENV_CHOICE: str(tmp_path / "missing.so")}, [])


def test_with_preloaded_prepends_once_and_keeps_other_preloads(tmp_path):
    library = tmp_path / "libtcmalloc_minimal.so.4"
    env = with_preloaded(library, {"LD_PRELOAD": "/opt/libother.so", "HOME": "/home/x"})
    assert env["LD_PRELOAD"] == f"{library} /opt/libother.so"
    assert env["HOME"] == "/home/x" and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in env
    assert is_preloaded(library, env)
    assert with_preloaded(library, env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # already there: unchanged
    assert with_preloaded(None, {"A": "1"}) == {"A": "1"}
    assert not is_preloaded(library, {"LD_PRELOAD": "/opt/libother.so:/opt/libthird.so"})


def test_import_minilora_loads_no_torch():
    # train.py can only restart on another malloc cheaply while torch is not loaded yet
    code = "import sys, minilora, minilora.allocator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


_PROBE = ("from minilora.allocator import reexec_with_preferred_malloc; reexec_with_preferred_malloc(); "
          "print(any('libtcmalloc' in line for line in open('/proc/self/maps')))")


def _run_probe(choice: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env[ENV_CHOICE] = choice
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, cwd=REPO, env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux features")
def test_a_process_restarts_once_on_tcmalloc_or_stays_on_the_system_malloc():
    library = find_tcmalloc()
    if library is None:
        pytest.skip("no tcmalloc installed here (bash .ci/fetch-tcmalloc puts one into the virtual environment)")
    restarted = _run_probe(str(library))
    assert restarted.stdout.strip() == "True"
    assert restarted.stderr.count("restarting on libtcmalloc") == 1
    kept = _run_probe("system")
    assert kept.stdout.strip() == "False" and "restarting" not in kept.stderr


def _installed(name: str) -> str:
    """A console script of pyproject's [project.scripts], as pip put it beside this interpreter."""
    script = Path(sys.executable).parent / name
    assert script.is_file(), f"{script} is missing: `pip install -e .` installs it ([project.scripts])"
    return str(script)


@pytest.mark.parametrize("name, flag", [("minilora-train", "--resume"), ("minilora-eval", "--adapter"),
                                        ("minilora-predict", "--adapter")])
def test_the_installed_commands_run_without_the_checkout(tmp_path, name, flag):
    """The wheel has no train.py / eval.py: its commands are these scripts, run here from another folder."""
    out = subprocess.run([_installed(name), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: " + name) and flag in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is a Linux feature")
@pytest.mark.parametrize("command", [["train.py"], ["eval.py"], ["-m", "minilora.predict"], ["minilora-train"]])
def test_every_command_line_entry_point_restarts_on_tcmalloc(command):
    library = find_tcmalloc()
    if library is None:
        pytest.skip("no tcmalloc installed here (bash .ci/fetch-tcmalloc puts one into the virtual environment)")
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env[ENV_CHOICE] = str(library)
    if command[0].startswith("minilora-"):  # the restart runs `python <script>` again
        command = [_installed(command[0])]
    out = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("restarting on libtcmalloc") == 1 and "usage:" in out.stdout


def test_a_mistyped_minilora_malloc_stops_the_script_with_a_clear_error(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env[ENV_CHOICE] = str(tmp_path / "libnothere.so")
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2
    assert f"error: {ENV_CHOICE}=" in out.stderr and "libnothere.so" in out.stderr and "Traceback" not in out.stderr


def test_libraries_the_loader_would_refuse_are_not_preloaded(tmp_path):
    assert cannot_preload(_fake_library(tmp_path / "venv", "libtcmalloc.so.4")) is None
    assert "space or a colon" in cannot_preload(_fake_library(tmp_path / "my venv", "libtcmalloc.so.4"))
    assert "space or a colon" in cannot_preload(_fake_library(tmp_path / "a:b", "libtcmalloc.so.4"))
    (tmp_path / "libbroken.so").write_text("not a library")
    assert "no ELF header" in cannot_preload(tmp_path / "libbroken.so")
    assert preloaded_malloc({"LD_PRELOAD": "/opt/libother.so /usr/lib/libjemalloc.so.2"}) == "/usr/lib/libjemalloc.so.2"
    assert preloaded_malloc({"LD_PRELOAD": "/opt/libother.so"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is a Linux feature")
def test_a_library_the_loader_would_refuse_keeps_the_system_malloc_or_stops_when_named(tmp_path):
    library = find_tcmalloc()
    if library is None:
        pytest.skip("no tcmalloc installed here (bash .ci/fetch-tcmalloc puts one into the virtual environment)")
    spaced = tmp_path / "my venv" / "lib"
    spaced.mkdir(parents=True)
    (spaced / library.name).write_bytes(library.read_bytes())
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", ENV_CHOICE)}
    env["VIRTUAL_ENV"] = str(tmp_path / "my venv")  # auto finds the copy with a space in its path first
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, cwd=REPO,
                         env=env)
    assert out.stdout.strip() == "False" and "keeping the system malloc" in out.stderr
    assert "ld.so" not in out.stderr and "restarting" not in out.stderr
    (tmp_path / "libbroken.so").write_text("not a library")
    env[ENV_CHOICE] = str(tmp_path / "libbroken.so")
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2 and "no ELF header" in out.stderr and "ld.so" not in out.stderr
