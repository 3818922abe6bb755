"""The LM head and cross-entropy at the supervised positions, one vocabulary chunk at a time.

At the few supervised rows the head's products are thin (M = N rows: ~80-100 GFLOP/s on this CPU
against ~180 for square ones) and there are two of them, the logits and then their gradient, each
streaming Gemma 3's 671 MB (262k x 640, fp32) weight, with a (N, V) logits tensor and its softmax in
between. Here one pass over the weight does both. For each chunk of the vocabulary, while that
slice of the weight is in cache:

    logits_c = h @ W_c.T                               (N, C), in fp32
    m, s     running max and sum of exp(logit - m)     (online softmax, Milakov & Gimelshein 2018)
    acc      running sum of exp(logit - m) @ W_c        (N, H)

so that at the end, with lse = m + log(s):

    nll    = lse - h . W[target]
    d nll / d h = softmax @ W - W[target] = acc / s - W[target]

The gradient is computed in the forward (it is needed only as a multiple of it) and backward scales it.
No (N, V) tensor is made. Same loss and gradient as `F.cross_entropy(model.project(h), targets)` to
fp32 rounding (tests/test_head_loss.py); the composed form is used where this does not apply: a
head that is not a plain bias-free Linear (an adapter on it), a trained head weight, a soft-capped head.

`head_log_probs_at` is the same idea without gradients, for scoring: the full-vocabulary log-softmax
read at a few tokens (the labels' first tokens), its normaliser built one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import CausalLM, soft_cap

VOCAB_CHUNK = 2048  # rows of the head weight per step: 5 MB in fp32 at H = 640, cache-resident on CPUs


def plain_head_weight(model: CausalLM) -> Tensor | None:
    """The (V, H) weight when the LM head is a bias-free nn.Linear, so that reading the weight chunk by
    chunk computes the head; None for anything else (an adapter on the head, a quantized head)."""
    head = model.lm_head
    return head.weight if type(head) is torch.nn.Linear and head.bias is None else None


def head_cross_entropy(model: CausalLM, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(nll (N,) in fp32, greedy prediction (N,)) of the LM head at final hidden states (N, H)."""
    weight = plain_head_weight(model)
    if (weight is None or weight.requires_grad or model.config.final_logit_softcap is not None
            or hidden.shape[0] == 0):
        logits = model.project(hidden).float()
        return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)
    return _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, VOCAB_CHUNK)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        rows = hidden.shape[0]
        running_max = torch.full((rows,), -torch.inf, device=hidden.device)
        exp_sum = torch.zeros(rows, device=hidden.device)
        weighted = torch.zeros(rows, weight.shape[1], device=hidden.device)  # (N, H) fp32
        predicted = torch.zeros(rows, dtype=torch.long, device=hidden.device)
        for start in range(0, weight.shape[0], chunk):
            piece = weight[start : start + chunk]  # (C, H)
            logits = (hidden @ piece.t()).float()  # (N, C)
            chunk_max, chunk_argmax = logits.max(dim=1)
            better = chunk_max > running_max  # ties keep the earlier index, as argmax does
            predicted = torch.where(better, chunk_argmax + start, predicted)
            new_max = torch.maximum(running_max, chunk_max)
            rescale = torch.exp(running_max - new_max)  # (N,); 0 on the first chunk
            probs = torch.exp(logits.sub_(new_max[:, None]))  # unnormalised, (N, C)
            exp_sum = exp_sum * rescale + probs.sum(dim=1)
            if piece.dtype == weighted.dtype:  # out of place: (N, H) is small, and FLOP counters see addmm
                weighted = torch.addmm(weighted.mul_(rescale[:, None]), probs, piece)
            else:  # a bf16 head: product in its dtype, sums in fp32
                weighted = weighted * rescale[:, None] + (probs.to(piece.dtype) @ piece).float()
            running_max = new_max
        target_rows = weight[targets].float()  # (N, H)
        nll = running_max + exp_sum.log() - (hidden.float() * target_rows).sum(dim=1)
        ctx.save_for_backward(weighted.div_(exp_sum[:, None]).sub_(target_rows))  # d nll / d hidden
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(predicted)
        return nll, predicted

    @staticmethod
    def backward(ctx, grad_nll: Tensor, _grad_predicted: Tensor):
        (grad_rows,) = ctx.saved_tensors
        return (grad_nll[:, None] * grad_rows).to(ctx.hidden_dtype), None, None, None


@torch.no_grad()
def head_log_probs_at(model: CausalLM, hidden: Tensor, tokens: Tensor, chunk: int = VOCAB_CHUNK) -> Tensor:
    """(N, K) fp32: log_softmax(model.project(hidden))[:, tokens], for final hidden states (N, H) and
    token ids (K,). The log-sum-exp over the vocabulary is taken chunk by chunk into one reused
    (N, chunk) buffer, so the (N, V) logits and their log-softmax, 2 x 268 MB for 256 rows of Gemma 3's
    262k vocabulary, are never made."""
    weight, cap, rows = plain_head_weight(model), model.config.final_logit_softcap, hidden.shape[0]
    normaliser = getattr(model.lm_head, "log_sum_exp", None)  # a head with its own (int8.Int8Head)
    if weight is None and normaliser is None:
        return torch.log_softmax(model.project(hidden).float(), dim=-1)[:, tokens]

    def capped(logits: Tensor) -> Tensor:  # as model.project, in place on a buffer of our own
        return logits if cap is None else soft_cap(logits, cap, in_place=True)

    if normaliser is None:
        buffer = hidden.new_empty(rows * min(chunk, weight.shape[0]))

        def chunk_logits(start: int, end: int) -> Tensor:  # into the reused buffer, contiguous for the last chunk too
            return capped(torch.mm(hidden, weight[start:end].t(), out=buffer[: rows * (end - start)].view(rows, -1)))

        normaliser = partial(log_sum_exp_by_chunks, chunk_logits, weight.shape[0], chunk=chunk)
    picked = capped(hidden @ model.lm_head.weight[tokens].t()).float()  # (N, K)
    return picked - normaliser(hidden)[:, None]


def log_sum_exp_by_chunks(chunk_logits: Callable[[int, int], Tensor], vocab: int, hidden: Tensor,
                          chunk: int = VOCAB_CHUNK) -> Tensor:
    """(N,) fp32 log sum_v exp(logit_v) over a vocabulary of `vocab` rows for the N rows of `hidden`,
    where chunk_logits(start, end) gives the (N, end - start) logits of vocabulary rows start:end."""
    chunk_lse = torch.empty(hidden.shape[0], -(-vocab // chunk), device=hidden.device)
    for index, start in enumerate(range(0, vocab, chunk)):
        chunk_lse[:, index] = torch.logsumexp(chunk_logits(start, min(start + chunk, vocab)).float(), dim=1)
    return torch.logsumexp(chunk_lse, dim=1)
