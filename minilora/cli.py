"""argparse built from a config dataclass: one flag per field, help from the field's metadata."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any


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


def run_cli(config_cls: type, run, description: str, argv=None) -> int:
    """Parse flags into config_cls, call run(config); errors print one line and exit with code 2."""
    import sys

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, config_cls)
    config = config_from_args(config_cls, parser.parse_args(argv))
    try:
        run(config)
    except (ValueError, OSError, RuntimeError, ImportError) as err:  # OSError: a path that is not what it should be
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
