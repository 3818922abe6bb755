"""Fine-tune a LoRA / QLoRA adapter for financial sentiment classification.

    python train.py --model gemma-3-270m --data ../shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip

Every setting of the run is a flag (python train.py --help); the flags as given are saved in the output
folder (run_config.json), and --resume checks them.
"""

import sys

from minilora.allocator import reexec_with_preferred_malloc


def main(argv=None) -> int:
    from minilora.cli import run_cli
    from minilora.finetune import RunConfig, run  # loads torch: after the malloc choice below

    return run_cli(RunConfig, run, __doc__, argv)


if __name__ == "__main__":
    reexec_with_preferred_malloc()  # before torch loads: tcmalloc if installed (minilora/allocator.py)
    sys.exit(main())
