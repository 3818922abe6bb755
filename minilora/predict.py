"""Classify sentences with a trained adapter.

    python -m minilora.predict --model gemma-3-270m --adapter runs/finetune/adapter "Profit rose 20 %."
    cat sentences.txt | python -m minilora.predict --model gemma-3-270m --adapter runs/finetune/adapter

Prints one JSON line per sentence: the label and each label's probability (the label-sequence
probabilities renormalised over the label set). A blank input line gets a line with label null.
"""

from __future__ import annotations

import argparse
import json
import sys

from .allocator import reexec_with_preferred_malloc


def main(argv=None) -> int:
    import torch  # with the modules below, after the malloc choice under __main__

    from .adapter_io import base_model_check, load_adapter
    from .data import parse_label_set
    from .device import pick_device, pick_dtype
    from .finetune import build_model, make_formatter
    from .prompts import DEFAULT_LABELS
    from .scoring import label_logprobs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", help="sentences to classify (default: one per line on stdin)")
    parser.add_argument("--model", default="gemma-3-270m", help="base model the adapter was trained on")
    parser.add_argument("--adapter", default=None, help="adapter folder (omit for the zero-shot base model)")
    parser.add_argument("--labels", default=",".join(DEFAULT_LABELS), help="comma-separated label set")
    parser.add_argument("--prompt-template", default=None, help="template file used in training")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"])
    parser.add_argument("--qlora", action="store_true", help="load the base in NF4 as in QLoRA training")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    try:
        lines = [_valid_text(text, f"argument {i}") for i, text in enumerate(args.sentences, 1)] or _stdin_lines()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # a blank line still gets its output line (label null), so output line i answers input line i
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        print("error: no sentences given (arguments or stdin)", file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)
        loaded, tokenizer = build_model(args.model, device, pick_dtype(device, args.dtype), args.qlora)
        if args.adapter:
            load_adapter(loaded.model, args.adapter, config_check=base_model_check(args.model))
        labels = parse_label_set(args.labels)  # as train.py / eval.py read it
        formatter = make_formatter(tokenizer, args.prompt_format, args.prompt_template, labels)
        logprobs = label_logprobs(loaded.model, formatter, sentences)
    except (ValueError, OSError, RuntimeError, ImportError) as err:  # as train.py / eval.py: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    scored = iter(torch.softmax(logprobs, dim=1).tolist())
    for line in lines:
        if not line.strip():
            print(json.dumps({"text": "", "label": None, "probabilities": None}))
            continue
        probs = next(scored)
        best = max(range(len(labels)), key=lambda i: probs[i])
        print(json.dumps({"text": line.strip(), "label": labels[best],
                          "probabilities": {label: round(p, 4) for label, p in zip(labels, probs)}}))
    return 0


def _stdin_lines() -> list[str]:
    """stdin's lines as UTF-8 whatever the locale (whose decoding could pass bad bytes on as surrogates, which
    the tokenizer refuses with a traceback); a UTF-8 BOM, which Windows editors write, is not text."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream with no bytes underneath (embedding, tests)
        lines = sys.stdin.read().split("\n")
    else:
        lines = []
        for number, raw in enumerate(stream.read().split(b"\n"), start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"stdin line {number} is not UTF-8 (byte {raw[err.start:err.start + 1]!r} at "
                                 f"column {err.start + 1}); convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if lines and not lines[-1]:  # the newline that ends the last line starts no line
        lines.pop()
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    return [_valid_text(line, f"stdin line {i}") for i, line in enumerate(lines, 1)]


def _valid_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a surrogate: bytes the locale could not decode, passed through
        raise ValueError(f"{where} is not valid UTF-8 text (at column {err.start + 1})") from None
    return text


if __name__ == "__main__":
    reexec_with_preferred_malloc()  # before torch loads: tcmalloc if installed (allocator.py)
    sys.exit(main())
