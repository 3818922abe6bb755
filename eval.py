"""Evaluate the base model and fine-tuned adapters side by side on a test split.

    python eval.py --model gemma-3-270m --adapter runs/finetune/adapter \
        --data ../shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip --output-dir runs/eval

Writes one report folder per run (report.json, predictions.csv, confusion_matrix.png, summary.md)
and comparison.md with the side-by-side table.
"""

import argparse
import sys

from minilora.cli import add_config_arguments, config_from_args
from minilora.compare import EvalConfig, run_comparison


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, EvalConfig)
    parser.set_defaults(adapter=[])
    cfg = config_from_args(EvalConfig, parser.parse_args(argv))
    try:
        run_comparison(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
