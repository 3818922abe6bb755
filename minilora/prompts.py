"""Prompts and tokenized examples: the single place where text becomes token ids.

Training and evaluation both call `PromptFormatter.prompt_ids`, so prompts are tokenized identically.
Prompt and answer are tokenized separately and concatenated (masks built from ids, never by searching
for a response template), BOS appears exactly once, and the answer always ends with eos / the chat
template's end-of-turn token so a fine-tuned model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import Tokenizer

DEFAULT_LABELS = ("positive", "neutral", "negative")
DEFAULT_TEMPLATE = (
    "Analyze the sentiment of the news headline enclosed in square brackets, determine if it is positive, "
    'neutral, or negative, and return the answer as the corresponding sentiment label "positive" or "neutral" '
    'or "negative".\n\n[{text}] ='
)
IGNORE_INDEX = -100  # label value of positions without loss (prompt, padding)


class PromptError(ValueError):
    """A prompt template or example that cannot be tokenized as required."""


def load_template(path: str | Path | None) -> str:
    """The default instruction, or a user template file that must contain exactly one {text} slot."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"--prompt-template {path}: cannot be read as UTF-8 text ({err})") from None
    if text.count("{text}") != 1:
        raise PromptError(f"{path}: a prompt template needs exactly one {{text}} slot, found {text.count('{text}')}")
    # the answer follows after one space (plain) or the turn header (chat): an editor's final newline
    # or a trailing space would put other text before it than the same template typed inline
    return text.rstrip()


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]  # everything the model conditions on (BOS ... '=' or the chat turn header)
    answer_ids: list[int]  # the supervised tokens: label tokens + eos / end-of-turn
    label: str


class PromptFormatter:
    """Turns a sentence into prompt ids and a label into answer ids for one tokenizer.

    chat=True renders the prompt as a user turn through the checkpoint's chat template
    (instruction-tuned checkpoints need it); the answer is then the bare label + end-of-turn.
    chat=False uses the raw instruction; the answer is ' <label>' + eos.
    """

    def __init__(self, tokenizer: Tokenizer, template: str = DEFAULT_TEMPLATE, chat: bool = False,
                 labels: tuple[str, ...] = DEFAULT_LABELS):
        if chat and not tokenizer.chat_template:
            raise PromptError(f"{tokenizer.folder}: chat formatting asked for, but the checkpoint has no chat template")
        self.tokenizer, self.template, self.chat, self.labels = tokenizer, template, chat, tuple(labels)
        self.stop_id = tokenizer.end_of_turn_id() if chat else tokenizer.eos_id
        self.label_ids = {label: self._label_tokens(label) for label in self.labels}
        for label, ids in self.label_ids.items():
            if not ids:
                raise PromptError(f"label {label!r} tokenizes to no tokens")
        if len(set(self.labels)) < len(self.labels):
            raise PromptError(f"labels {list(self.labels)}: a label is repeated")
        seen: dict[tuple[int, ...], str] = {}
        for label, ids in self.label_ids.items():
            other = seen.setdefault(tuple(ids), label)
            if other != label:  # scores could not tell them apart
                raise PromptError(f"labels {other!r} and {label!r} tokenize to the same tokens {ids}")

    @property
    def scored_ids(self) -> dict[str, list[int]]:
        """The tokens `score` sums log-probabilities over: each label's, and the stop token too when one
        label's tokens begin another's ("buy" in "buy-more"): log p("buy") is at least log p("buy-more"),
        so without the stop the longer label could never win."""
        ids = self.label_ids.values()
        if any(len(a) < len(b) and b[: len(a)] == a for a in ids for b in ids):
            return {label: tokens + [self.stop_id] for label, tokens in self.label_ids.items()}
        return self.label_ids

    def _label_tokens(self, label: str) -> list[int]:
        """The label's tokens as they follow the prompt: ' positive' after '=', and after the turn header
        whatever the template writes before an answer (Llama 2's ' ' after [/INST]). Tokenized after a
        sample prompt and cut off from it, because a tokenizer that prepends '▁' to every text it encodes
        (Llama 2's) would give ['▁▁', 'positive'] for ' positive' alone."""
        answer = self._chat_answer(label) if self.chat else " " + label
        prompt = self.tokenizer.encode(self.prompt_text("x"), add_special_tokens=False)
        together = self.tokenizer.encode(self.prompt_text("x") + answer, add_special_tokens=False)
        if together[: len(prompt)] == prompt and len(together) > len(prompt):
            return together[len(prompt):]
        return self.tokenizer.encode(answer, add_special_tokens=False)  # merged across the boundary: alone

    def _chat_answer(self, label: str) -> str:
        """The text between the generation prompt and the label's end in a rendered assistant turn: the
        label, plus what the template puts before it (' positive' in Llama 2's '[/INST] positive </s>')."""
        user = [{"role": "user", "content": self.template.replace("{text}", "x")}]
        header = self.tokenizer.apply_chat_template(user, add_generation_prompt=True)

        def turn(content: str) -> str:
            return self.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": content}],
                                                      add_generation_prompt=False)

        marker = "\u2063ANSWER\u2063"  # found where the content goes, whatever text the label also is
        marked = turn(marker)
        if not marked.startswith(header) or marker not in marked[len(header):]:
            return label  # a template that renders the turn otherwise: the label as it is
        answer = marked[len(header):].split(marker, 1)[0] + label
        return answer if turn(label).startswith(header + answer) else label  # else it rewrites the content

    def prompt_text(self, text: str) -> str:
        if "\n" in text or "\r" in text:  # the template promises one line of text before the answer
            text = " ".join(text.split())
        filled = self.template.replace("{text}", text)
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], add_generation_prompt=True)
        return filled

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the prompt, starting with BOS exactly once when the checkpoint uses one.

        The chat template writes its own BOS (Gemma); a tokenizer that does not add BOS by itself
        (SmolLM2, whose "bos" <|im_start|> opens every chat turn) gets none added."""
        tok = self.tokenizer
        ids = tok.encode(self.prompt_text(text), add_special_tokens=False)
        if tok.adds_bos and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        if tok.bos_id is not None and ids[:2] == [tok.bos_id, tok.bos_id]:
            raise PromptError(f"prompt for {text[:40]!r} starts with BOS twice (template and tokenizer both add it)")
        if tok.adds_bos and not self.chat and ids.count(tok.bos_id) != 1:
            raise PromptError(f"prompt for {text[:40]!r} holds BOS {ids.count(tok.bos_id)} times; expected once")
        return ids

    def answer_ids(self, label: str) -> list[int]:
        if label not in self.label_ids:
            raise PromptError(f"label {label!r} is not one of {self.labels}")
        return self.label_ids[label] + [self.stop_id]

    def tokenize(self, text: str, label: str) -> TokenizedExample:
        return TokenizedExample(self.prompt_ids(text), self.answer_ids(label), label)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    labels: torch.Tensor  # (B, T) target ids at answer positions, IGNORE_INDEX elsewhere
    weights: torch.Tensor  # (B,) per-example loss weight (class weights), 1.0 by default

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.weights)))


def collate(examples: list[TokenizedExample], pad_id: int, max_len: int,
            class_weights: dict[str, float] | None = None) -> Batch:
    """Right-pad prompt + answer. Labels mark the answer only; padding is masked by position, so an
    eos answer token is supervised even when pad shares its id."""
    rows = [ex.prompt_ids + ex.answer_ids for ex in examples]
    for ex, row in zip(examples, rows):
        if len(row) > max_len:
            raise PromptError(
                f"an example needs {len(row)} tokens (prompt {len(ex.prompt_ids)} + answer {len(ex.answer_ids)}) "
                f"but max_seq_len is {max_len}; raise --max-seq-len"
            )
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ex, row) in enumerate(zip(examples, rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(ex.prompt_ids) : len(row)] = torch.tensor(ex.answer_ids)
    weights = torch.tensor([(class_weights or {}).get(ex.label, 1.0) for ex in examples], dtype=torch.float32)
    return Batch(input_ids, mask, labels, weights)


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all sequences (the instruction before the text)."""
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for i in range(length):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return length
