"""The command lines: argparse built from a config dataclass (one flag per field, help from the
field's metadata), and the train / eval commands themselves. `train.py` and `eval.py` call them; a
wheel installs them as `minilora-train`, `minilora-eval` and `minilora-predict` (pyproject.toml)."""

from __future__ import annotations

import argparse
import signal
import threading
import types
import typing
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable

from .allocator import reexec_with_preferred_malloc

TRAIN_HELP = """Fine-tune a LoRA / QLoRA adapter for financial sentiment classification.

    python train.py --model gemma-3-270m --data ../shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip

Every setting of the run is a flag (python train.py --help); the flags as given are saved in the output
folder (run_config.json), and --resume checks them.
"""

EVAL_HELP = """Evaluate the base model and fine-tuned adapters side by side on a test split.

    python eval.py --model gemma-3-270m --adapter runs/finetune/adapter \\
        --data ../shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip --output-dir runs/eval

Writes one report folder per run (report.json, predictions.csv, confusion_matrix.png, summary.md)
and comparison.md with the side-by-side table.
"""


def _base_type(annotation: Any) -> type:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    if isinstance(annotation, str):  # postponed annotations: "int", "str | None", ...
        return hints.get(annotation.split("|")[0].strip(), str)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if str(f.type).startswith("list"):  # repeatable: --adapter A B or --adapter A --adapter B
            parser.add_argument(flag, action="extend", nargs="+", default=[], help=help_text)
            continue
        kind = _base_type(f.type)
        default = f.default if f.default is not MISSING else None
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                                help=f"{help_text} (default: {default})")


def config_from_args(config_cls: type, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})


def run_cli(config_cls: type, run, description: str, argv=None,
            interrupted: Callable[[Any], str] = lambda config: "interrupted") -> int:
    """Parse flags into config_cls, call run(config); errors print one line and exit with code 2, Ctrl-C or
    SIGTERM prints interrupted(config) and exits with code 130."""
    import sys

    from safetensors import SafetensorError  # what a failed safetensors write raises (a full disk)

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls)
    config = config_from_args(config_cls, parser.parse_args(argv))
    try:
        with _sigterm_as_interrupt():
            run(config)
    except KeyboardInterrupt:
        print(interrupted(config), file=sys.stderr)
        return 130
    # OSError: a path that is not what it should be
    except (ValueError, OSError, RuntimeError, ImportError, SafetensorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what a job scheduler sends) ends the command as Ctrl-C does, rather than killing it
    without a word. Signal handlers can only be set from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:  # None: a handler not set from Python (an embedding program), which cannot be put back
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def train(argv=None) -> int:
    from .finetune import RunConfig, run  # loads torch: after the malloc choice of the caller

    return run_cli(RunConfig, run, TRAIN_HELP, argv, interrupted=_train_interrupted)


def _train_interrupted(config) -> str:
    """Where an interrupted training run stands, and how it goes on."""
    from .run_state import last_checkpoint_step

    folder = Path(config.output_dir) / "checkpoint"
    step = last_checkpoint_step(folder)
    if step is None:
        return f"interrupted; no checkpoint yet in {folder}"
    return f"interrupted; the last checkpoint (step {step}) is in {folder}: continue with --resume"


def evaluate(argv=None) -> int:
    from .compare import EvalConfig, run_comparison  # loads torch: after the malloc choice of the caller

    return run_cli(EvalConfig, run_comparison, EVAL_HELP, argv)


def _command(main) -> None:
    import sys

    reexec_with_preferred_malloc()  # before torch loads: tcmalloc if installed (allocator.py)
    sys.exit(main())


def train_command() -> None:
    """train.py and `minilora-train`."""
    _command(train)


def eval_command() -> None:
    """eval.py and `minilora-eval`."""
    _command(evaluate)


def predict_command() -> None:
    """`minilora-predict` (also `python -m minilora.predict`)."""
    from .predict import main

    _command(main)
