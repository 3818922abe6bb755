"""Label scoring against naive full-logits log-probs, generation with vs without the KV cache, and
predictions with merged vs unmerged adapters."""

import copy

import pytest
import torch

from minilora.checkpoint import load_model
from minilora.data import Example
from minilora.evaluate import predict
from minilora.finetune import validation_scores
from minilora.generate import generate, parse_label
from minilora.lora import LoraConfig, inject_adapters, lora_modules
from minilora.prompts import PromptFormatter
from minilora.scoring import label_logprobs
from minilora.tokenizer import Tokenizer
from tests.tiny import hf_model, nonzero_lora_B_, save_tiny_checkpoint, tiny_gemma_config, tiny_llama_config

TEXTS = ["w1 w2 w3 .", "w4 w5", "w6 w7 w8 w9 w10 w11 w12", "w13", "w14 w15 w16"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    config = tiny_llama_config() if request.param == "llama" else tiny_gemma_config(sliding_window=16)
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), hf_model(config))
    return load_model(folder).model, Tokenizer(folder)


def naive_logprob(model, prompt, label_tokens):
    ids = torch.tensor([prompt + label_tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(label_tokens))


LABEL_SETS = {
    "mixed lengths": {"positive": [5], "neutral": [6, 7], "negative": [8, 9, 10]},  # 1, 2 and 3 tokens
    "single tokens": {"positive": [5], "neutral": [6], "negative": [8]},  # no continuation pass
    "one begins another": {"positive": [5], "neutral": [5, 7], "negative": [8]},  # scored with the stop token
}


@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("labels", list(LABEL_SETS))
@pytest.mark.parametrize("head_rows", [256, 2])  # 2: the first-token head runs in several chunks
def test_scores_equal_naive_sum_of_token_logprobs(tiny, share_prefix, labels, head_rows, monkeypatch):
    monkeypatch.setattr("minilora.scoring.HEAD_ROWS", head_rows)
    model, tok = tiny
    fmt = PromptFormatter(tok)
    fmt.label_ids = LABEL_SETS[labels]
    scores = label_logprobs(model, fmt, TEXTS, batch_size=2, share_prefix=share_prefix)
    stop = [fmt.stop_id] if labels == "one begins another" else []
    for i, text in enumerate(TEXTS):
        for j, label in enumerate(fmt.labels):
            expected = naive_logprob(model, fmt.prompt_ids(text), fmt.label_ids[label] + stop)
            assert abs(scores[i, j].item() - expected) < 1e-4


def test_a_label_that_begins_another_can_win():
    """log p("1") >= log p("1", "0"): scored without the stop token, "10" could never be predicted."""
    fmt = PromptFormatter.__new__(PromptFormatter)
    fmt.stop_id, fmt.label_ids = 2, {"1": [33], "10": [33, 32], "2": [34]}
    assert fmt.scored_ids == {"1": [33, 2], "10": [33, 32, 2], "2": [34, 2]}
    fmt.label_ids = {"1": [33], "2": [34, 35]}
    assert fmt.scored_ids == fmt.label_ids  # no label begins another: the stop token's head rows are saved


def test_scores_of_a_bf16_model_equal_its_naive_sum(tiny):
    """bf16 is the default dtype on CUDA: scoring keeps the activations' dtype (it once mixed in fp32)."""
    model, tok = copy.deepcopy(tiny[0]).to(torch.bfloat16), tiny[1]
    fmt = PromptFormatter(tok)
    fmt.label_ids = LABEL_SETS["mixed lengths"]
    scores = label_logprobs(model, fmt, TEXTS, batch_size=2)
    assert scores.dtype == torch.float32
    for i, text in enumerate(TEXTS):
        for j, label in enumerate(fmt.labels):
            expected = naive_logprob(model, fmt.prompt_ids(text), fmt.label_ids[label])
            assert abs(scores[i, j].item() - expected) < 0.05  # bf16 rounding, on log-probabilities near -10


def with_adapters(tiny, labels: str):
    """(the tiny model, a copy of it with non-zero LoRA adapters, a formatter with LABEL_SETS[labels])."""
    base, tok = tiny
    model = copy.deepcopy(base)
    inject_adapters(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    nonzero_lora_B_(model, std=0.2)
    fmt = PromptFormatter(tok)
    fmt.label_ids = LABEL_SETS[labels]
    return base, model, fmt


@pytest.mark.parametrize("method", ["score", "generate"])
def test_predict_with_merged_adapters_equals_unmerged(tiny, method):
    base, model, fmt = with_adapters(tiny, "mixed lengths")
    weights = {name: m.base_layer.weight.detach().clone() for name, m in lora_modules(model)}
    merged = predict(model, fmt, TEXTS, method, batch_size=2, max_new_tokens=3, merged=True)
    unmerged = predict(model, fmt, TEXTS, method, batch_size=2, max_new_tokens=3, merged=False)
    assert merged.predicted == unmerged.predicted
    if method == "score":
        without_adapters = label_logprobs(base, fmt, TEXTS, batch_size=2)
        assert (unmerged.logprobs - without_adapters).abs().max() > 1e-2  # the adapters matter
        torch.testing.assert_close(merged.logprobs, unmerged.logprobs, atol=1e-5, rtol=0)
    assert all(torch.equal(m.base_layer.weight, weights[name]) and not m.merged for name, m in lora_modules(model))


def test_validation_scores_with_merged_adapters_equal_unmerged(tiny):
    base, model, fmt = with_adapters(tiny, "single tokens")
    examples = [Example(text, label) for text, label in zip(TEXTS, ["positive", "neutral", "negative"] * 2)]
    weights = {name: m.base_layer.weight for name, m in lora_modules(model)}
    merged = validation_scores(model, fmt, examples, batch_size=2)
    assert all(m.base_layer.weight is weights[name] and not m.merged for name, m in lora_modules(model))
    unmerged = validation_scores(model, fmt, examples, batch_size=2, merged=False)
    without_adapters = validation_scores(base, fmt, examples, batch_size=2)
    assert abs(unmerged["loss"] - without_adapters["loss"]) > 1e-3  # the adapters matter
    assert merged["accuracy"] == unmerged["accuracy"]
    assert abs(merged["loss"] - unmerged["loss"]) < 1e-5


def test_generation_of_no_prompts_is_empty(tiny):
    assert generate(tiny[0], [], max_new_tokens=3, stop_ids={2}, pad_id=0) == []


def test_generation_with_cache_equals_without(tiny):
    model, tok = tiny
    fmt = PromptFormatter(tok)
    prompts = [fmt.prompt_ids(t) for t in TEXTS]
    cached = generate(model, prompts, 6, stop_ids={tok.eos_id}, pad_id=tok.pad_id, use_cache=True)
    uncached = generate(model, prompts, 6, stop_ids={tok.eos_id}, pad_id=tok.pad_id, use_cache=False)
    assert cached == uncached
    # and each row equals generating it alone (left padding changes nothing)
    for prompt, row in zip(prompts, cached):
        assert generate(model, [prompt], 6, stop_ids={tok.eos_id}, pad_id=tok.pad_id) == [row]


def test_parse_label():
    labels = ("positive", "neutral", "negative")
    assert parse_label(" Positive.", labels) == "positive"
    assert parse_label('"neutral"', labels) == "neutral"
    assert parse_label(" The answer is negative", labels) == "invalid"
    assert parse_label("", labels) == "invalid"
    assert parse_label("Positively", labels) == "invalid" and parse_label("positive-ish", labels) == "positive"
    assert parse_label(" 2 (medium)", ("1", "2", "3")) == "2" and parse_label("12", ("1", "2")) == "invalid"
    assert parse_label("strong-buy!", ("buy", "strong-buy")) == "strong-buy"
    assert parse_label("Very_Bad", ("very_bad", "ok")) == "very_bad"
    # markdown and typographic quotes, as chat models write them
    assert [parse_label(t, labels) for t in ("**Positive**", "`neutral`", "\u201cnegative\u201d")] == list(labels)
    assert parse_label("1.5", ("1", "2")) == "invalid" and parse_label("1. Because", ("1", "2")) == "1"


def test_generate_decodes_long_enough_for_the_longest_label(tiny, monkeypatch):
    """A label of 5 tokens needs more than the 4 new tokens a one-token label set gets."""
    import importlib

    evaluate_module = importlib.import_module("minilora.evaluate")
    model, tok = tiny
    fmt = PromptFormatter(tok, labels=("w1 w2 w3 w4 w5", "w6"))
    longest = fmt.label_ids["w1 w2 w3 w4 w5"]
    assert len(longest) == 5
    asked = []

    def answer_with_the_longest_label(model, prompts, max_new_tokens, stop_ids, pad_id):
        asked.append(max_new_tokens)
        return [longest[:max_new_tokens] for _ in prompts]  # a model that spells the label out

    monkeypatch.setattr(evaluate_module, "generate", answer_with_the_longest_label)
    result = predict(model, fmt, TEXTS[:2], "generate", merged=False)
    assert asked == [8] and result.predicted == ["w1 w2 w3 w4 w5"] * 2
    assert predict(model, PromptFormatter(tok), TEXTS[:1], "generate", merged=False).predicted == ["invalid"]
    assert asked[-1] == 4  # one-token labels: as before


def test_generate_refuses_an_empty_prompt(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty: each needs at least one token"):
        generate(model, [[5, 6, 7], []], 3, {2}, 0)


@pytest.mark.parametrize("method", ["score", "generate"])
def test_a_prompt_longer_than_the_models_positions_is_named(tiny, method):
    """The tiny models know 256 positions: a 300-word row was scored on positions they never saw."""
    model, tok = tiny
    fmt = PromptFormatter(tok)
    long_text = " ".join(f"w{i % 90}" for i in range(300))
    with pytest.raises(ValueError, match=r"a prompt of \d+ tokens and \d+ answer tokens is longer than the "
                                         r"model's max_position_embeddings 256: 'w0 w1 w2"):
        predict(model, fmt, ["w1 w2", long_text], method, batch_size=2)
