"""Classify by scoring: log p(label tokens | prompt) for every label, predict the argmax.

One forward over the prompts (the instruction prefix shared by all rows is computed once for the
whole run), then each label's continuation attends to the cached prompt keys / values. The LM head
runs only where a label token is predicted, and for the first label token on many rows at once: a
large vocabulary's head is memory-bound on a few rows (262k x 640 on this CPU: 10 ms per row in
batches of 16, 3.5 ms in batches of 256), and there its normaliser is built one vocabulary chunk at
a time (`head_loss.head_log_probs_at`), with no (rows, vocab) tensor. Never produces an invalid label.
"""

from __future__ import annotations

import torch

from .head_loss import head_log_probs_at
from .model import CausalLM, KVCache
from .prompts import PromptFormatter, common_prefix_length

HEAD_ROWS = 1024  # rows per pass over the LM head's weight for the first label token (bounds its buffer)


def _pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def label_logprobs(
    model: CausalLM,
    formatter: PromptFormatter,
    texts: list[str],
    batch_size: int = 16,
    share_prefix: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(N, n_labels) natural-log probability of each label's tokens, summed over its tokens; with the stop
    token too when one label's tokens begin another's (`PromptFormatter.scored_ids`)."""
    device = device or next(model.parameters()).device
    model.eval()
    prompts = [formatter.prompt_ids(t) for t in texts]
    label_ids = [formatter.scored_ids[label] for label in formatter.labels]
    check_context(model, prompts, texts, max(len(ids) for ids in label_ids))
    prefix_len = shared_prompt_prefix(prompts) if share_prefix else 0
    prefix_cache = None
    if prefix_len > 0:
        prefix = torch.tensor([prompts[0][:prefix_len]], device=device)
        prefix_cache = model(prefix, use_cache=True, logits_at="none").cache
    # longest first: batches of similar length waste less padding
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    last_hidden = None  # (N, H) in the activations' dtype (bf16 on CUDA), made at the first batch
    continuation = torch.empty(len(prompts), len(label_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [prompts[i][prefix_len:] for i in idx]
        hidden, rest = _score_rows(model, rows, label_ids, prefix_cache, formatter.tokenizer.pad_id, device)
        if last_hidden is None:
            last_hidden = hidden.new_empty(len(prompts), hidden.shape[1])
        last_hidden[idx], continuation[idx] = hidden, rest.cpu()
    first_tokens = torch.tensor([tokens[0] for tokens in label_ids], device=device)
    first = torch.empty(len(prompts), len(label_ids))
    for start in range(0, len(prompts), HEAD_ROWS):
        first[start : start + HEAD_ROWS] = head_log_probs_at(model, last_hidden[start : start + HEAD_ROWS],
                                                             first_tokens).cpu()
    return first + continuation


def check_context(model: CausalLM, prompts: list[list[int]], texts: list[str], answer_tokens: int) -> None:
    """Positions past max_position_embeddings were never trained (RoPE runs on, but the model has not
    seen them): a prompt that long is named rather than scored."""
    if not prompts:
        return
    limit = model.config.max_position_embeddings
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + answer_tokens > limit:
        raise ValueError(f"a prompt of {len(prompts[longest])} tokens and {answer_tokens} answer tokens is longer "
                         f"than the model's max_position_embeddings {limit}: {texts[longest][:60]!r}")


def shared_prompt_prefix(prompts: list[list[int]]) -> int:
    """Tokens computed once for the whole run: the common prefix, leaving each row >= 1 own token."""
    if len(prompts) < 2:
        return 0
    return min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)


def _score_rows(model: CausalLM, rows: list[list[int]], label_ids: list[list[int]],
                prefix_cache: KVCache | None, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden state at each row's last prompt token (B, H), where the first label token is
    predicted, and log p(rest of each label | prompt, its first token) (B, n_labels)."""
    ids, mask = _pad_right(rows, pad_id, device)
    multi_token = any(len(tokens) > 1 for tokens in label_ids)
    last = torch.arange(len(rows), device=device) * ids.shape[1] + mask.sum(1) - 1  # flat (B*T) positions
    out = model(ids, attention_mask=mask, cache=prefix_cache, use_cache=multi_token, logits_at="none", outputs_at=last)
    last_hidden = out.hidden  # (B, H): the last layer ran only there
    scores = []
    for tokens in label_ids:
        total = torch.zeros(len(rows), device=device)
        if len(tokens) > 1:  # the rest of the label, attending to the cached prompt
            label_inputs = torch.tensor([tokens[:-1]], device=device).expand(len(rows), -1)
            logits = model(label_inputs, cache=out.cache, logits_at="all").logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)  # (B, m - 1, V)
            targets = torch.tensor(tokens[1:], device=device)
            total = logprobs[:, torch.arange(len(tokens) - 1), targets].sum(-1)
        scores.append(total)
    return last_hidden, torch.stack(scores, dim=1)


def predict_labels(logprobs: torch.Tensor, labels: tuple[str, ...]) -> list[str]:
    return [labels[i] for i in logprobs.argmax(dim=1).tolist()]
