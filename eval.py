"""Evaluate the base model and adapters side by side (`python eval.py --help`). Installed from a
wheel, the same command is `minilora-eval`; the code is minilora/cli.py -> minilora/compare.py."""

from minilora.cli import eval_command, evaluate as main

__all__ = ["main"]  # main(argv) -> exit code, for callers that import this file

if __name__ == "__main__":
    eval_command()
