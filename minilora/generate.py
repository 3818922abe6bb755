"""Greedy (or sampled) decoding with the KV cache, and parsing of a generated label."""

from __future__ import annotations

import re

import torch

from .model import CausalLM


def _pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, device=device)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    use_cache: bool = True,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). temperature 0 is greedy.

    Prompts are left-padded so every row's next token is at the last position; with use_cache=False
    the whole sequence is recomputed each step (the reference the cached path is tested against)."""
    if not prompts:
        return []
    empty = [i for i, prompt in enumerate(prompts) if len(prompt) == 0]
    if empty:  # its first token would be predicted from padding alone
        raise ValueError(f"prompts {empty} are empty: each needs at least one token (e.g. BOS)")
    device = next(model.parameters()).device
    model.eval()
    ids, mask = _pad_left(prompts, pad_id, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    out = model(ids, attention_mask=mask, use_cache=use_cache, logits_at="last")
    for _ in range(max_new_tokens):
        logits = out.logits.float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new_tokens.append(token)
        done |= torch.isin(token, torch.tensor(sorted(stop_ids), device=device))
        if bool(done.all()):
            break
        step_mask = (~done).long()[:, None] | 1  # the just-emitted token is real for every row
        if use_cache:
            out = model(token[:, None], attention_mask=step_mask, cache=out.cache, use_cache=True, logits_at="last")
        else:
            ids = torch.cat((ids, token[:, None]), dim=1)
            mask = torch.cat((mask, step_mask), dim=1)
            out = model(ids, attention_mask=mask, logits_at="last")
    generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    results = []
    for row in generated:
        kept = []
        for token in row:
            if token in stop_ids:
                break
            kept.append(token)
        results.append(kept)
    return results


def parse_label(text: str, labels: tuple[str, ...], invalid: str = "invalid") -> str:
    """The label a generation starts with, as a whole word (case-insensitive, after spaces, opening
    quotes or brackets, and markdown's * / `), else `invalid`. Labels may hold digits, '_' or '-' ("1",
    "strong-buy"); a number goes on only as punctuation ("1." is 1, "1.5" is not)."""
    head = re.sub(r"^[\s\"'\[(*`\u201c\u2018\u00ab]*", "", text).lower()
    for label in sorted(labels, key=len, reverse=True):  # "buy" must not win over "buy-more"
        rest = head[len(label):]
        decimal = rest[:1] in (".", ",") and rest[1:2].isdigit()
        if head.startswith(label.lower()) and not (rest[:1].isalnum() or rest[:1] == "_" or decimal):
            return label
    return invalid
