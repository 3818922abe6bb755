"""Completion-only loss: cross-entropy on the answer tokens only, with the LM head run only there.

Returns the weighted NLL *sum* and the weight sum rather than a mean, so the training loop can divide
by the weight of the whole optimizer step: gradient accumulation then equals one big batch, whatever
number of answer tokens each micro-batch holds (a mean of per-micro-batch means would not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .head_loss import head_cross_entropy
from .model import CausalLM
from .prompts import IGNORE_INDEX, Batch


@dataclass
class LossTerms:
    nll_sum: torch.Tensor  # sum over answer tokens of weight * -log p(token)
    weight_sum: torch.Tensor  # sum of the weights of those tokens (their count with no class weights)
    tokens: int  # number of answer tokens
    correct_first: torch.Tensor  # (B,) greedy prediction of each answer's first token was right


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool of the positions whose *next* token is supervised, and those targets (N,)."""
    next_labels = labels[:, 1:]
    supervised = next_labels != IGNORE_INDEX
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = supervised
    return select, next_labels[supervised]


def completion_loss(model: CausalLM, batch: Batch, share_prefix: int = 0) -> LossTerms:
    """Answer-token NLL of a right-padded batch.

    share_prefix = P > 0: the first P tokens are identical in every row (the instruction); they are
    run once with batch size 1 and every row attends to their keys / values. Gradients reach the
    adapters through those keys / values, so loss and gradients equal the unshared computation (with
    adapter dropout, the prefix's masks are drawn once and shared by the rows: each row's masks are as
    random as before, but no longer independent of the other rows').
    """
    select, targets = supervised_positions(batch.labels)
    token_weights = batch.weights[:, None].expand_as(batch.labels)[select]
    if share_prefix > 0:
        if bool((select[:, :share_prefix]).any()):
            raise ValueError(f"shared prefix of {share_prefix} tokens overlaps a supervised position")
        # one short row: its activations are small, so checkpointing it would only add recompute work;
        # only its keys / values are read, so the last layer computes no output for it (empty outputs_at)
        prefix_ids = batch.input_ids[:1, :share_prefix]
        no_outputs = torch.zeros(0, dtype=torch.long, device=prefix_ids.device)
        prefix = model(prefix_ids, use_cache=True, logits_at="none", recompute=False, outputs_at=no_outputs).cache
        hidden = model(
            batch.input_ids[:, share_prefix:], attention_mask=batch.attention_mask[:, share_prefix:],
            cache=prefix, outputs_at=select[:, share_prefix:], logits_at="none",
        ).hidden
    else:
        hidden = model(batch.input_ids, attention_mask=batch.attention_mask, outputs_at=select, logits_at="none").hidden
    nll, predicted = head_cross_entropy(model, hidden, targets)  # (N,) in fp32; the head reads only these rows
    # first answer token of each row: the label decision, used for a cheap training accuracy
    first = select & (select.cumsum(dim=1) == 1)
    first_in_selection = first[select]
    correct_first = predicted[first_in_selection] == targets[first_in_selection]
    return LossTerms((nll * token_weights).sum(), token_weights.sum(), int(targets.numel()), correct_first)
