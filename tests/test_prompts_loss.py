"""Prompt tokenization, answer masking and the completion-only loss, checked by hand on tiny models."""

import pytest
import torch
import torch.nn.functional as F

from minilora.checkpoint import load_model
from minilora.loss import completion_loss
from minilora.prompts import DEFAULT_TEMPLATE, IGNORE_INDEX, PromptError, PromptFormatter, collate
from minilora.tokenizer import Tokenizer
from tests.tiny import hf_model, save_tiny_checkpoint, tiny_gemma_config, tiny_llama_config, write_tiny_tokenizer

TEXTS = ["w1 w2 w3 .", "w4 w5", "w6 w7 w8 w9 w10 w11 w12", "w13"]
LABELS = ["positive", "neutral", "negative", "neutral"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    config = tiny_llama_config() if request.param == "llama" else tiny_gemma_config()
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp(request.param), hf_model(config))
    model = load_model(folder).model
    return model, Tokenizer(folder)


def test_default_template_is_the_seed_prompt():
    assert DEFAULT_TEMPLATE.endswith('"negative".\n\n[{text}] =')
    assert DEFAULT_TEMPLATE.count("\n") == 2 and DEFAULT_TEMPLATE.startswith("Analyze the sentiment of the news headline")


def test_prompt_has_bos_once_and_answer_ends_with_eos(tiny):
    _, tok = tiny
    fmt = PromptFormatter(tok)
    ex = fmt.tokenize("w1 w2", "positive")
    assert ex.prompt_ids[0] == tok.bos_id and ex.prompt_ids.count(tok.bos_id) == 1
    assert ex.answer_ids == tok.encode(" positive", add_special_tokens=False) + [tok.eos_id]
    # the same ids as tokenizing the whole prompt with the checkpoint's own special-token handling
    assert ex.prompt_ids == tok.encode(fmt.prompt_text("w1 w2"))


def test_chat_prompt_keeps_single_bos_and_ends_turn(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }} <eot> {% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
    )
    write_tiny_tokenizer(tmp_path, 160, chat_template=template)
    tok = Tokenizer(tmp_path)
    fmt = PromptFormatter(tok, chat=True)
    ex = fmt.tokenize("w1", "neutral")
    assert ex.prompt_ids.count(tok.bos_id) == 1 and ex.prompt_ids[0] == tok.bos_id
    assert ex.answer_ids[-1] == 3  # <eot>, the template's end of turn


def test_collate_masks_prompt_and_padding_but_not_eos_equal_to_pad(tiny):
    _, tok = tiny
    fmt = PromptFormatter(tok)
    examples = [fmt.tokenize(t, l) for t, l in zip(TEXTS[:2], LABELS[:2])]
    batch = collate(examples, pad_id=tok.eos_id, max_len=512)  # pad shares eos's id on purpose
    for row, ex in enumerate(examples):
        supervised = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert supervised == ex.answer_ids  # eos included although it equals the pad id
    assert batch.attention_mask.sum().item() == sum(len(e.prompt_ids) + len(e.answer_ids) for e in examples)


def test_prompt_longer_than_max_len_is_a_clear_error(tiny):
    _, tok = tiny
    fmt = PromptFormatter(tok)
    with pytest.raises(PromptError, match="max_seq_len is 10; raise --max-seq-len"):
        collate([fmt.tokenize("w1", "positive")], tok.pad_id, max_len=10)


def test_labels_that_scoring_could_not_tell_apart_are_refused(tiny):
    """A repeated label made predict's probabilities sum to less than 1; two labels with the same tokens
    always get the same score."""
    with pytest.raises(PromptError, match="a label is repeated"):
        PromptFormatter(tiny[1], labels=("positive", "positive", "negative"))
    with pytest.raises(PromptError, match=r"labels 'bullish' and 'bearish' tokenize to the same tokens"):
        PromptFormatter(tiny[1], labels=("bullish", "bearish"))  # both <unk> for the tiny word-level vocabulary


def test_loss_is_mean_nll_of_answer_tokens_by_hand(tiny):
    model, tok = tiny
    fmt = PromptFormatter(tok)
    examples = [fmt.tokenize(t, l) for t, l in zip(TEXTS, LABELS)]
    batch = collate(examples, tok.pad_id, 512)
    with torch.no_grad():
        terms = completion_loss(model, batch)
        expected = []
        for ex in examples:  # each example alone, full logits, NLL of its answer tokens only
            ids = torch.tensor([ex.prompt_ids + ex.answer_ids])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
            for k, token in enumerate(ex.answer_ids):
                expected.append(-logprobs[len(ex.prompt_ids) - 1 + k, token])
    expected = torch.stack(expected)
    assert terms.tokens == len(expected)
    torch.testing.assert_close(terms.nll_sum / terms.weight_sum, expected.mean(), rtol=1e-5, atol=1e-5)


def test_head_only_at_supervised_positions_equals_full_logits(tiny):
    model, tok = tiny
    fmt = PromptFormatter(tok)
    batch = collate([fmt.tokenize(t, l) for t, l in zip(TEXTS, LABELS)], tok.pad_id, 512)
    with torch.no_grad():
        terms = completion_loss(model, batch)
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
        full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1))
    torch.testing.assert_close(terms.nll_sum / terms.weight_sum, full, rtol=1e-5, atol=1e-5)


def test_class_weights_weight_each_example(tiny):
    model, tok = tiny
    fmt = PromptFormatter(tok)
    examples = [fmt.tokenize(t, l) for t, l in zip(TEXTS, LABELS)]
    plain = collate(examples, tok.pad_id, 512)
    weighted = collate(examples, tok.pad_id, 512, class_weights={"positive": 3.0, "neutral": 1.0, "negative": 0.5})
    with torch.no_grad():
        a, b = completion_loss(model, plain), completion_loss(model, weighted)
        per_example = [completion_loss(model, collate([ex], tok.pad_id, 512)).nll_sum for ex in examples]
    w = torch.tensor([3.0, 1.0, 0.5, 1.0])
    n = torch.tensor([float(len(ex.answer_ids)) for ex in examples])
    torch.testing.assert_close(b.nll_sum, (torch.stack(per_example) * w).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.weight_sum, (w * n).sum())
    torch.testing.assert_close(a.weight_sum, n.sum())


def test_shared_prefix_gives_same_loss_and_gradients(tiny):
    model, tok = tiny
    fmt = PromptFormatter(tok)
    examples = [fmt.tokenize(t, l) for t, l in zip(TEXTS, LABELS)]
    batch = collate(examples, tok.pad_id, 512)
    prefix = 20
    assert all(ex.prompt_ids[:prefix] == examples[0].prompt_ids[:prefix] for ex in examples)
    results = []
    for share in (0, prefix):
        model.zero_grad()
        terms = completion_loss(model, batch, share_prefix=share)
        (terms.nll_sum / terms.weight_sum).backward()
        results.append((terms.nll_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


def test_newline_ids_are_the_tokens_holding_a_newline(tiny):
    _, tok = tiny
    newline = tok.backend.token_to_id("\n")
    assert tok.newline_ids == {newline}
    assert tok.newline_ids is tok.newline_ids  # scanned once per tokenizer


def _legacy_sentencepiece_folder(folder):
    """A tokenizer.json laid out as Llama 2's / TinyLlama's: the normalizer prepends '▁' to every text it
    encodes and turns spaces into '▁'. Its pieces make ' positive' alone come out as ['▁▁', 'positive']."""
    import json

    from tokenizers import Tokenizer as HFTokenizer, models, normalizers

    pieces = ["<unk>", "<s>", "</s>"] + [c for c in "abcdefghijklmnopqrstuvwxyzINST=[]./"] + ["▁"]
    vocab = [(p, -3.0) for p in pieces] + [("▁▁", -1.0), ("positive", -1.0), ("▁positive", -1.5),
                                            ("negative", -1.0), ("▁negative", -1.5)]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    llama2_chat = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": llama2_chat}))
    return Tokenizer(folder)


def test_label_tokens_are_those_that_follow_the_prompt_in_one_encoding(tmp_path):
    tok = _legacy_sentencepiece_folder(tmp_path)
    assert [tok.token(i) for i in tok.encode(" positive", add_special_tokens=False)] == ["▁▁", "positive"]
    fmt = PromptFormatter(tok, template="[{text}] =", labels=("positive", "negative"))
    prompt = fmt.prompt_ids("ab")
    for label in fmt.labels:
        together = tok.encode(fmt.prompt_text("ab") + " " + label, add_special_tokens=False)
        assert together[: len(prompt)] == prompt and fmt.label_ids[label] == together[len(prompt):]
        assert [tok.token(i) for i in fmt.label_ids[label]] == [f"▁{label}"]  # was ['▁▁', label]
    # Llama 2's chat template writes ' positive' after '[/INST]': the label is that, not a piece of ']positive'
    chat = PromptFormatter(tok, template="{text}", chat=True, labels=("positive", "negative"))
    user = [{"role": "user", "content": "ab"}]
    header = tok.encode(tok.apply_chat_template(user), add_special_tokens=False)
    for label in chat.labels:
        turn = tok.apply_chat_template(user + [{"role": "assistant", "content": label}], add_generation_prompt=False)
        ids = tok.encode(turn, add_special_tokens=False)
        assert ids[: len(header)] == header and chat.label_ids[label] == ids[len(header): len(header) + 1]
        assert [tok.token(i) for i in chat.label_ids[label]] == [f"▁{label}"]
    assert tok.token(chat.stop_id) == "</s>"


def test_a_template_files_trailing_newline_and_spaces_are_dropped(tmp_path):
    """An editor's final newline put '\\n' between '=' and the answer: not the prompt typed inline."""
    from minilora.prompts import load_template

    path = tmp_path / "template.txt"
    path.write_text("Sentiment of [{text}] =  \n")
    assert load_template(path) == "Sentiment of [{text}] ="


def test_a_chat_label_is_cut_where_the_content_goes_not_where_its_text_first_appears(tmp_path):
    """A label named like text the template writes before an answer ('assistant' in '[assistant] ')."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} <eot> {% else %}"
                "[assistant] {{ m['content'] }} <eot> {% endif %}{% endfor %}")
    write_tiny_tokenizer(tmp_path, 160, chat_template=template)
    tok = Tokenizer(tmp_path)
    fmt = PromptFormatter(tok, template="{text}", chat=True, labels=("assistant", "positive"))
    assert fmt._chat_answer("assistant") == "[assistant] assistant"  # was '[assistant'
    assert fmt._chat_answer("positive") == "[assistant] positive"
