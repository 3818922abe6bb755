"""Fine-tune a LoRA / QLoRA adapter (`python train.py --help`). Installed from a wheel, the same
command is `minilora-train`; the code is minilora/cli.py -> minilora/finetune.py."""

from minilora.cli import train as main, train_command

__all__ = ["main"]  # main(argv) -> exit code, for callers that import this file

if __name__ == "__main__":
    train_command()
