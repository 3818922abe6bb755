"""minilora: LoRA / QLoRA fine-tuning of Gemma 3 and Llama-family decoders in plain PyTorch."""
