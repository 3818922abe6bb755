"""The real packaged checkpoints: minilora vs transformers' own GGUF loading of the same file."""

import pytest
import torch

from minilora.checkpoint import load_model
from minilora.data import load_dataset
from minilora.generate import generate
from minilora.prompts import PromptFormatter
from minilora.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-4  # fp32; measured max-abs diff on these prompts: 0.0 for both checkpoints (same op order)


def _transformers_model(name):
    from transformers import AutoModelForCausalLM

    from minilora.packaged import _packaged_gguf

    gguf = _packaged_gguf(name)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_logits_and_greedy_continuations_match_transformers(name, packaged_folder, phrasebank_zip):
    folder = packaged_folder(name)
    ours = load_model(folder).model.eval()
    theirs = _transformers_model(name)
    tok = Tokenizer(folder)
    fmt = PromptFormatter(tok, chat=tok.chat_template is not None)
    sentences = [ex.text for ex in load_dataset(phrasebank_zip).test[::180][:5]]
    prompts = [fmt.prompt_ids(s) for s in sentences]
    worst = 0.0
    for ids in prompts:
        batch = torch.tensor([ids])
        with torch.no_grad():
            diff = (ours(batch).logits - theirs(input_ids=batch).logits).abs().max().item()
        worst = max(worst, diff)
    assert worst <= LOGIT_TOL, f"max-abs logit diff {worst:.2e}"

    ours_greedy = generate(ours, prompts, 8, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for ids, continuation in zip(prompts, ours_greedy):
        with torch.no_grad():
            out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, eos_token_id=sorted(tok.stop_ids),
                                  pad_token_id=tok.pad_id)
        expected = out[0, len(ids):].tolist()
        expected = expected[: next((i for i, t in enumerate(expected) if t in tok.stop_ids), len(expected))]
        assert continuation == expected, (tok.decode(continuation), tok.decode(expected))


@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_int8_scoring_agrees_with_fp32(name, packaged_folder, phrasebank_zip):
    """`predict(int8=True)` on the real checkpoints: measured on these 96 rows, 95 (Gemma) and 94
    (SmolLM2) equal predictions, mean |log-probability difference| 0.16 and 0.18."""
    from minilora.evaluate import predict

    folder = packaged_folder(name)
    model = load_model(folder).model.eval()
    tok = Tokenizer(folder)
    fmt = PromptFormatter(tok, chat=tok.chat_template is not None)
    texts = [ex.text for ex in load_dataset(phrasebank_zip).test[:96]]
    fp32 = predict(model, fmt, texts, "score")
    int8 = predict(model, fmt, texts, "score", int8=True)
    difference = (int8.logprobs - fp32.logprobs).abs()
    assert 0 < difference.mean() < 0.3
    assert sum(a == b for a, b in zip(fp32.predicted, int8.predicted)) >= 88
