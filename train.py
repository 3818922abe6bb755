"""Fine-tune a LoRA / QLoRA adapter for financial sentiment classification.

    python train.py --model gemma-3-270m --data ../shared/data/financial_phrasebank/FinancialPhraseBank-v1.0.zip

Every setting is a flag (python train.py --help); the resolved config is saved in the output folder.
"""

import argparse
import sys

from minilora.cli import add_config_arguments, config_from_args
from minilora.finetune import RunConfig, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RunConfig)
    cfg = config_from_args(RunConfig, parser.parse_args(argv))
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
