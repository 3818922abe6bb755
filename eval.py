"""Evaluate the base model and fine-tuned adapters side by side on a test split.

    python eval.py --model gemma-3-270m --adapter runs/finetune/adapter \
        --data ../shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip --output-dir runs/eval

Writes one report folder per run (report.json, predictions.csv, confusion_matrix.png, summary.md)
and comparison.md with the side-by-side table.
"""

import sys

from minilora.allocator import reexec_with_preferred_malloc


def main(argv=None) -> int:
    from minilora.cli import run_cli
    from minilora.compare import EvalConfig, run_comparison  # loads torch: after the malloc choice below

    return run_cli(EvalConfig, run_comparison, __doc__, argv)


if __name__ == "__main__":
    reexec_with_preferred_malloc()  # before torch loads: tcmalloc if installed (minilora/allocator.py)
    sys.exit(main())
