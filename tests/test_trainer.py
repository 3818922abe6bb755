"""The training loop: schedule, token-weighted accumulation, seeding, exact resume, end to end on a tiny model."""

import csv
import math
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from minilora.checkpoint import load_model
from minilora.finetune import RunConfig, RunError, run
from minilora.lora import LoraConfig, adapter_parameters, inject_adapters
from minilora.prompts import PromptFormatter, collate
from minilora.tokenizer import Tokenizer
from minilora.run_state import STATE_FILE
from minilora.trainer import LoopConfig, accumulate_gradients, lr_at, plan_steps
from tests.tiny import hf_model, save_tiny_checkpoint, tiny_llama_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hf_model(tiny_llama_config()))


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.csv"
    gen = torch.Generator().manual_seed(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(60):
            words = " ".join(f"w{int(t)}" for t in torch.randint(0, 100, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen))
            writer.writerow([f"{words} w{100 + i}", ("positive", "neutral", "negative")[i % 3]])
    return path


def test_schedule_warmup_then_cosine():
    cfg = LoopConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.0)
    values = [lr_at(s, 100, cfg) for s in range(100)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5, abs=1e-9)  # half way through the decay
    assert values[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_plan_is_deterministic_and_covers_each_row_once_per_epoch():
    lengths = [5, 9, 3, 7, 8, 2, 6, 4, 1, 10]
    cfg = LoopConfig(batch_size=3, grad_accum=2, epochs=2, seed=3)
    steps = plan_steps(lengths, cfg)
    assert steps == plan_steps(lengths, cfg)
    rows = [i for step in steps for batch in step for i in batch]
    assert sorted(rows) == sorted(list(range(10)) * 2)


def test_a_fractional_epoch_counts_as_hf_trainer_does():
    """ceil(epochs * batches per epoch): 900 rows in batches of 8 for 1.5 epochs are 170 steps (round() gave 169)."""
    for epochs, steps in ((1.5, 170), (0.5, 57), (2.25, 255)):
        assert len(plan_steps([5] * 900, LoopConfig(batch_size=8, epochs=epochs))) == steps
    assert len(plan_steps([5] * 100, LoopConfig(batch_size=1, epochs=0.3))) == 30  # 100 * 0.3 is 30.000000000000004
    # optimizer steps, not micro-batches: 7 batches in 3 steps per epoch, 0.7 of them is ceil(2.1) = 3 steps
    assert len(plan_steps([5] * 7, LoopConfig(batch_size=1, grad_accum=3, epochs=0.7))) == 3


def test_the_reported_loss_is_the_mean_nll_even_when_position_0_is_labelled(tiny_dir):
    """Position 0 predicts nothing: a label there (an empty prompt, through the library) counted in the step's
    weight but not in its loss, so the reported loss was too small by that share."""
    from minilora.loss import completion_loss

    model, tok, examples = _model_and_examples(tiny_dir)
    batch = collate(examples[:3], tok.pad_id, 512)
    batch.labels[:, 0] = batch.input_ids[:, 0]  # as if the prompt were empty
    terms = completion_loss(model, batch)
    mean_nll = float(terms.nll_sum / terms.weight_sum)
    model.zero_grad()
    loss = accumulate_gradients(model, [batch], torch.device("cpu"), False)[0]
    assert loss == pytest.approx(mean_nll, rel=1e-6)


def _model_and_examples(tiny_dir, seed=0):
    torch.manual_seed(seed)
    model = load_model(tiny_dir).model
    inject_adapters(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # non-zero B so every adapter parameter gets a gradient
        for p in adapter_parameters(model):
            p.normal_(0, 0.05)
    tok = Tokenizer(tiny_dir)
    fmt = PromptFormatter(tok)
    # answers of different lengths, so micro-batches hold different numbers of supervised tokens
    fmt.label_ids = {"positive": [10], "neutral": [11, 12, 13], "negative": [14, 15, 16, 17, 18]}
    labels = ["positive", "neutral", "negative", "negative", "positive", "positive", "neutral", "negative"]
    examples = [fmt.tokenize(f"w{i} w{i + 1}", label) for i, label in enumerate(labels)]
    return model, tok, examples


def test_accumulation_4x2_equals_batch_8_weighted_by_tokens(tiny_dir):
    model, tok, examples = _model_and_examples(tiny_dir)
    params = adapter_parameters(model)
    grads = []
    for size in (8, 2):
        model.zero_grad()
        batches = [collate(examples[s : s + size], tok.pad_id, 512) for s in range(0, 8, size)]
        accumulate_gradients(model, batches, torch.device("cpu"))
        grads.append([p.grad.clone() for p in params])
    for big, small in zip(*grads):
        torch.testing.assert_close(small, big, rtol=1e-5, atol=1e-7)
    # a mean of per-micro-batch means would differ here (different answer lengths per micro-batch)
    model.zero_grad()
    for s in range(0, 8, 2):
        batch = collate(examples[s : s + 2], tok.pad_id, 512)
        from minilora.loss import completion_loss

        terms = completion_loss(model, batch)
        (terms.nll_sum / terms.weight_sum / 4).backward()
    assert not all(torch.allclose(p.grad, g, rtol=1e-3, atol=1e-6) for p, g in zip(params, grads[0]))


@pytest.mark.parametrize("policy", ["none", "full", "selective", "mlp"])
def test_shared_prefix_accumulation_equals_plain(tiny_dir, policy):
    """Gradients flow into the adapters through the prefix's keys / values under every checkpoint policy."""
    model, tok, examples = _model_and_examples(tiny_dir)
    model.gradient_checkpointing = policy != "none"
    model.checkpoint_policy = "full" if policy == "none" else policy
    model.train()  # checkpointing applies in training mode only
    params = adapter_parameters(model)
    grads = []
    for share in (False, True):
        model.zero_grad()
        loss = accumulate_gradients(model, [collate(examples, tok.pad_id, 512)], torch.device("cpu"), share)[0]
        grads.append((loss, [p.grad.clone() for p in params]))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def _cfg(tiny_dir, tiny_csv, out, **overrides):
    base = dict(model=str(tiny_dir), data=str(tiny_csv), output_dir=str(out), train_per_class=8, test_per_class=4,
                max_steps=4, batch_size=4, grad_accum=2, lora_r=4, lora_alpha=8, lora_dropout=0.1, eval_every=2,
                save_every=2, val_limit=6, max_seq_len=128, warmup_ratio=0.25)
    base.update(overrides)
    return RunConfig(**base)


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_end_to_end_writes_adapter_metrics_and_report(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    metrics = run(_cfg(tiny_dir, tiny_csv, out), log=lambda line: None)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    for name in ("run_config.json", "data_info.json", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "eval/report.json", "eval/predictions.csv",
                 "eval/confusion_matrix.png", "best/adapter_config.json", "checkpoint/training_state.pt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "val_accuracy" in records[1] and "val_loss" in records[3]


def test_a_two_label_csv_trains_and_reports_on_its_own_label_set(tiny_dir, tmp_path):
    data = tmp_path / "two.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([f"w{i} w{i + 30}", ("positive", "negative")[i % 2]] for i in range(40))
    logs = []
    out = tmp_path / "run"
    metrics = run(_cfg(tiny_dir, data, out, labels="Positive, negative", max_steps=2), log=logs.append)
    assert any("note: labels ['positive', 'negative'] with the default prompt" in line for line in logs)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert list(report["metrics"]["per_class"]) == ["positive", "negative"]  # no class without support
    assert metrics["macro_f1"] == pytest.approx(
        sum(c["f1"] for c in report["metrics"]["per_class"].values()) / 2)
    with pytest.raises(ValueError, match="label 'negative' is not in the label set"):  # the default set is refused
        run(_cfg(tiny_dir, data, tmp_path / "three", labels="positive,neutral"), log=lambda line: None)


@pytest.mark.parametrize("labels", ["positive", "positive,positive", "positive,,negative"])
def test_a_label_set_that_cannot_classify_is_refused_before_anything_is_written(tiny_dir, tiny_csv, tmp_path, labels):
    with pytest.raises(ValueError, match=f"--labels: found {labels!r}, expected two or more"):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "run", labels=labels), log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_same_seed_same_adapter(tiny_dir, tiny_csv, tmp_path):
    first = _adapter_after(tiny_dir, tiny_csv, tmp_path / "a", seed=5)
    second = _adapter_after(tiny_dir, tiny_csv, tmp_path / "b", seed=5)
    third = _adapter_after(tiny_dir, tiny_csv, tmp_path / "c", seed=6)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


_FIRST_COS = """
import hashlib, torch
import minilora.model  # noqa: F401  (what every run imports before its first forward)
angles = torch.rand(429, 1, 16, generator=torch.Generator().manual_seed(0)) * 60
print(hashlib.md5(angles.cos().numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_runs_repeat_across_processes_from_their_first_rope_table():
    """torch's first cos / sin in a process rounds differently in 10-30 % of processes here; RoPE's
    tables are a run's first, so without minilora.model settling it a resumed run could differ from an
    uninterrupted one by an ulp. Without the settling call this test failed 3 runs of 3."""
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", _FIRST_COS], capture_output=True, text=True, check=True)
               .stdout.strip() for _ in range(16)}  # one at a time: run side by side, they disagreed less
    assert len(digests) == 1, digests


def _adapter_after(tiny_dir, tiny_csv, out, **kw):
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0, save_every=0, **kw), log=lambda line: None)
    return _adapter(out)


class Crash(Exception):
    pass


def test_resume_after_interruption_gives_the_same_adapter(tiny_dir, tiny_csv, tmp_path):
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "full"), log=lambda line: None)

    def crash_at_step_3(line):
        if line.startswith("step 3/4"):
            raise Crash  # after step 3's update, before any checkpoint of it

    interrupted = _cfg(tiny_dir, tiny_csv, tmp_path / "resumed")
    with pytest.raises(Crash):
        run(interrupted, log=crash_at_step_3)
    assert not (tmp_path / "resumed" / "adapter").exists()
    logs = []
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", resume=True), log=logs.append)
    assert any("resumed from" in line and "at step 2/4" in line for line in logs)
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "resumed")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)  # the clock goes on from the checkpoint (it restarted at 0)


def test_resume_refuses_data_that_changed_since_the_run_started(tiny_dir, tiny_csv, tmp_path):
    data = tmp_path / "rows.csv"
    shutil.copy(tiny_csv, data)

    def crash_at_step_3(line):
        if line.startswith("step 3/4"):
            raise Crash

    with pytest.raises(Crash):
        run(_cfg(tiny_dir, data, tmp_path / "run"), log=crash_at_step_3)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1] + [lines[-1].replace("negative", "positive")]) + "\n")  # one label
    with pytest.raises(RunError, match=r"the data differs from the run in .*\(sha256 and split_counts changed"):
        run(_cfg(tiny_dir, data, tmp_path / "run", resume=True), log=lambda line: None)
    shutil.copy(tiny_csv, data)  # the same rows again: the run goes on
    run(_cfg(tiny_dir, data, tmp_path / "run", resume=True), log=lambda line: None)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("inside", ["--data", "--prompt-template"])
def test_overwrite_never_deletes_the_runs_own_inputs(tiny_dir, tiny_csv, tmp_path, inside):
    out = tmp_path / "run"
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=1, eval_every=0, save_every=0), log=lambda line: None)
    data, template = out / "rows.csv", out / "template.txt"
    shutil.copy(tiny_csv, data)
    template.write_text("w1 [{text}] =")
    settings = {"data": data} if inside == "--data" else {"prompt_template": str(template)}
    with pytest.raises(RunError, match=f"--overwrite empties {out}, and {inside} .* is inside it"):
        run(_cfg(tiny_dir, settings.pop("data", tiny_csv), out, overwrite=True, **settings), log=lambda line: None)
    assert data.is_file() and template.is_file() and (out / "adapter").is_dir()


def test_resume_refuses_a_prompt_template_whose_text_changed(tiny_dir, tiny_csv, tmp_path):
    """Same path, other text: the rest of the run would train on other prompts than its first steps."""
    template = tmp_path / "template.txt"
    template.write_text("w1 [{text}] =")
    out = tmp_path / "run"
    settings = dict(max_steps=1, eval_every=0, save_every=0, prompt_template=str(template))
    run(_cfg(tiny_dir, tiny_csv, out, **settings), log=lambda line: None)
    template.write_text("w1 [{text}] =\n")  # an editor's newline: read as the same text
    run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=lambda line: None)
    template.write_text("w2 [{text}] =")
    with pytest.raises(RunError, match=r"--resume: the prompt template's text differs from the one the run in"):
        run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=lambda line: None)


def test_resume_refuses_prompts_that_tokenize_otherwise_now(tiny_dir, tiny_csv, tmp_path):
    """The same template text can give other tokens (another tokenizer file, or a minilora version that cuts
    label tokens otherwise): run_config.json's prompt_tokens_sha256 tells."""
    out = tmp_path / "run"
    settings = dict(max_steps=1, eval_every=0, save_every=0)
    run(_cfg(tiny_dir, tiny_csv, out, **settings), log=lambda line: None)
    saved = json.loads((out / "run_config.json").read_text())
    assert len(saved["prompt_tokens_sha256"]) == 64
    run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=lambda line: None)  # the same tokens
    (out / "run_config.json").write_text(json.dumps({**saved, "prompt_tokens_sha256": "0" * 64}))
    with pytest.raises(RunError, match=r"--resume: the prompts or labels of the run in .* tokenize otherwise now"):
        run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=lambda line: None)


def test_bad_paths_are_refused_naming_the_flag_before_the_model_loads(tiny_dir, tiny_csv, tmp_path, monkeypatch):
    import importlib

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad path was found")

    monkeypatch.setattr(importlib.import_module("minilora.finetune"), "build_model", no_model)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 [{text}] =".encode("latin-1"))
    (tmp_path / "a_file").write_text("")
    for settings, message in (
        (dict(prompt_template=str(tmp_path / "missing.txt")), "--prompt-template .*missing.txt: cannot be read"),
        (dict(prompt_template=str(latin1)), "--prompt-template .*latin1.txt: cannot be read as UTF-8"),
        (dict(output_dir=str(tmp_path / "a_file" / "run")), "--output-dir .* cannot be made: .*a_file is a file"),
    ):
        out = settings.pop("output_dir", tmp_path / "run")
        with pytest.raises(ValueError, match=message):
            run(_cfg(tiny_dir, tiny_csv, out, **settings), log=lambda line: None)


def test_a_resume_may_change_how_the_final_evaluation_runs(tiny_dir, tiny_csv, tmp_path):
    settings = dict(max_steps=2, eval_every=0, save_every=1)

    def crash_at_step_2(line):
        if line.startswith("step 2/2"):
            raise Crash

    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "run", **settings), log=crash_at_step_2)
    metrics = run(_cfg(tiny_dir, tiny_csv, tmp_path / "run", resume=True, eval_limit=5, eval_method="generate",
                       **settings), log=lambda line: None)
    assert metrics["n"] == 5 and "n_invalid" in metrics
    with pytest.raises(RunError, match="settings differ from the run .*lr was 0.0002, now 0.001"):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "run", resume=True, lr=1e-3, **settings), log=lambda line: None)


def test_resume_before_the_first_checkpoint_starts_over_with_a_fresh_log(tiny_dir, tiny_csv, tmp_path):
    settings = dict(save_every=0, eval_every=0)  # the only checkpoint is the last step's
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "full", **settings), log=lambda line: None)

    def crash_at_step_3(line):
        if line.startswith("step 3/4"):
            raise Crash

    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", **settings), log=crash_at_step_3)
    logs = []
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", resume=True, **settings), log=logs.append)
    assert any("no checkpoint in" in line and "starts at step 0" in line for line in logs)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # not 1, 2, 3, 1, 2, 3, 4
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "resumed")
    assert all(torch.equal(resumed[key], full[key]) for key in full)

    logs = []  # resuming the finished run: nothing to train, and the final loss is still known
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", resume=True, **settings), log=logs.append)
    final = next(line for line in logs if line.startswith("trained 4 steps"))
    assert "final loss nan" not in final and "final loss" in final


@pytest.mark.parametrize("crash", ["between the renames", "before the clean-up"])
def test_a_crash_inside_the_checkpoint_swap_resumes_from_the_complete_checkpoint(tiny_dir, tiny_csv, tmp_path,
                                                                                 crash):
    out = tmp_path / "run"
    run(_cfg(tiny_dir, tiny_csv, out), log=lambda line: None)
    checkpoint, old = out / "checkpoint", out / "checkpoint.old"
    if crash == "between the renames":  # only the previous checkpoint, under .old
        checkpoint.rename(old)
    else:  # the new one in place and the previous one not yet removed
        shutil.copytree(checkpoint, old)
    logs = []
    run(_cfg(tiny_dir, tiny_csv, out, resume=True), log=logs.append)  # nothing left to train
    assert any(line.startswith(f"resumed from {checkpoint} at step 4/4") for line in logs)
    assert (checkpoint / STATE_FILE).is_file() and not old.exists()


@pytest.mark.parametrize("failing_validation", [1, 2])  # at step 2, at the last step (4)
def test_a_failing_validation_loses_no_training(tiny_dir, tiny_csv, tmp_path, monkeypatch, failing_validation):
    """The checkpoint of a step is written before its validation; a resume runs that validation first."""
    import minilora.finetune as finetune

    run(_cfg(tiny_dir, tiny_csv, tmp_path / "full"), log=lambda line: None)
    real_scores, calls = finetune.validation_scores, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_validation:
            raise Crash
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(finetune, "validation_scores", fails_once)
    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed"), log=lambda line: None)
    logs = []
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", resume=True), log=logs.append)
    assert any("resumed from" in line and f"at step {2 * failing_validation}/4" in line for line in logs)

    for folder in ("adapter", "best"):
        full = load_file(tmp_path / "full" / folder / "adapter_model.safetensors")
        resumed = load_file(tmp_path / "resumed" / folder / "adapter_model.safetensors")
        assert all(torch.equal(resumed[key], full[key]) for key in full), folder
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("full", "resumed")}
    assert [r["step"] for r in records["resumed"]] == [1, 2, 3, 4]
    for full, resumed in zip(records["full"], records["resumed"]):
        assert {k: v for k, v in resumed.items() if k.startswith("val_")} == \
               {k: v for k, v in full.items() if k.startswith("val_")}
        assert resumed["loss"] == full["loss"]
    assert "val_accuracy" in records["resumed"][1] and "val_accuracy" in records["resumed"][3]


def test_output_folder_of_another_run_is_refused(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(RunError, match="already holds files .* --resume .* --overwrite"):
        run(_cfg(tiny_dir, tiny_csv, out), log=lambda line: None)
    assert (out / "notes.txt").read_text() == "precious"


def test_overwrite_replaces_a_run_only_after_the_new_settings_load(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=1, eval_every=0), log=lambda line: None)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for mistake, error in ((dict(data=str(tmp_path / "typo.csv")), "typo.csv"),
                           (dict(target_modules="qkv_proj"), "matched no linear module"),
                           (dict(lora_alpha=0), "alpha must be > 0")):
        with pytest.raises((RunError, FileNotFoundError, ValueError), match=error):
            run(_cfg(tiny_dir, tiny_csv, out, overwrite=True, **mistake), log=lambda line: None)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, mistake  # the old run is whole
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0, overwrite=True), log=lambda line: None)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # replaced, not appended to


def test_overwrite_never_empties_a_folder_that_holds_no_run(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "documents"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    with pytest.raises(RunError, match="holds files but no run"):
        run(_cfg(tiny_dir, tiny_csv, out, overwrite=True), log=lambda line: None)
    assert (out / "notes.txt").read_text() == "precious" and (out / "sub").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file, not a folder"):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "file"), log=lambda line: None)


@pytest.mark.parametrize("setting,message", [
    (dict(batch_size=0), "--batch-size must be >= 1, found 0"),
    (dict(grad_accum=0), "--grad-accum must be >= 1, found 0"),
    (dict(max_steps=-1, epochs=0), "--epochs must be > 0"),
    (dict(save_every=-2), "--save-every must be >= 0, found -2"),
    (dict(warmup_ratio=1.5), r"--warmup-ratio must be in \[0, 1\], found 1.5"),
    (dict(class_weights="balanced", balanced_sampling=True), "together they over-correct"),
    (dict(lora_dropout=1.0), r"adapter settings: .*dropout must be in \[0, 1\)"),
])
def test_settings_out_of_range_are_refused_before_anything_is_written(tiny_dir, tiny_csv, tmp_path, setting, message):
    with pytest.raises(RunError, match=message):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "run", **setting), log=lambda line: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing", ["train", "test"])
def test_a_data_file_without_training_or_test_rows_is_refused_before_training(tiny_dir, tmp_path, missing):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "split"])
        splits = [s for s in ("train", "validation", "test") if s != missing]
        writer.writerows((f"w{i} w{i + 1}", ("positive", "neutral", "negative")[i % 3], splits[i % 2])
                         for i in range(30))
    name = {"train": "training", "test": "test"}[missing]
    with pytest.raises(RunError, match=f"the {name} split is empty"):
        run(_cfg(tiny_dir, path, tmp_path / "run"), log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_the_same_folder_resumes_under_any_path_that_reaches_it(tiny_dir, tiny_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0), log=lambda line: None)
    (tmp_path / "link").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    for spelling in (f"{out}/", "./run", "link", "../" + tmp_path.name + "/run"):
        logs = []
        run(_cfg(tiny_dir, tiny_csv, spelling, max_steps=2, eval_every=0, resume=True), log=logs.append)
        assert any("resumed from" in line for line in logs), spelling


def test_overwrite_empties_the_folder_and_keeps_it(tiny_dir, tiny_csv, tmp_path, monkeypatch):
    """The folder may be a symlink or the working directory: it is emptied, never removed."""
    target = tmp_path / "target"
    run(_cfg(tiny_dir, tiny_csv, target, max_steps=1, eval_every=0), log=lambda line: None)
    (tmp_path / "link").symlink_to(target)
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "link", max_steps=2, eval_every=0, overwrite=True), log=lambda line: None)
    assert (tmp_path / "link").is_symlink() and len((target / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.chdir(target)
    run(_cfg(tiny_dir, tiny_csv, ".", max_steps=1, eval_every=0, overwrite=True), log=lambda line: None)
    assert len((target / "metrics.jsonl").read_text().splitlines()) == 1


def test_leftovers_of_a_cut_write_do_not_block_the_next_run(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json.tmp").write_text('{"model": ')  # what a crash in the first write leaves
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=1, eval_every=0), log=lambda line: None)
    assert not list(out.glob("*.tmp")) and (out / "run_config.json").is_file()


def test_resume_drops_a_metrics_line_an_interrupted_append_cut_short(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0), log=lambda line: None)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.02')
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0, resume=True), log=lambda line: None)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_different_settings_is_refused(tiny_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0), log=lambda line: None)
    with pytest.raises(RunError, match="lr was 0.0002, now 0.001"):
        run(_cfg(tiny_dir, tiny_csv, out, max_steps=2, eval_every=0, lr=1e-3, resume=True), log=lambda line: None)


def test_max_seq_len_shorter_than_prompt_is_refused(tiny_dir, tiny_csv, tmp_path):
    """Refused before anything is written, with how many rows are over and the longest one shown."""
    with pytest.raises(RunError, match=r"24 training example\(s\) are longer than --max-seq-len 8; the longest has "
                                       r"\d+ tokens: 'w\d+ w"):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "run", max_seq_len=8), log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_a_validation_row_longer_than_max_seq_len_does_not_stop_the_run(tiny_dir, tmp_path):
    """--max-seq-len bounds the training rows, checked before the first step; a longer validation row
    is validated whole (it once ended a SmolLM2 run at its first validation, before any checkpoint)."""
    from minilora.data import load_dataset
    from minilora.finetune import make_formatter
    from minilora.tokenizer import Tokenizer

    path = tmp_path / "rows.csv"
    long_text = " ".join(f"w{t}" for t in range(40))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(f"w{i % 50} w{100 + i}", ("positive", "neutral", "negative")[i % 3]) for i in range(59)])
        writer.writerow([long_text, "neutral"])
    seed = next(s for s in range(100)  # a split that puts the long row in validation
                if long_text in [ex.text for ex in load_dataset(path, train_per_class=8, test_per_class=4,
                                                                seed=s).validation])
    splits = load_dataset(path, train_per_class=8, test_per_class=4, seed=seed)
    formatter = make_formatter(Tokenizer(tiny_dir), "auto", None, splits.info.labels)
    def length(ex) -> int:
        tokenized = formatter.tokenize(ex.text, ex.label)
        return len(tokenized.prompt_ids) + len(tokenized.answer_ids)

    longest_train, longest_validation = max(map(length, splits.train)), max(map(length, splits.validation))
    assert longest_validation > longest_train + 20

    out = tmp_path / "run"
    run(_cfg(tiny_dir, path, out, seed=seed, max_seq_len=longest_train, val_limit=0, max_steps=2, eval_every=1),
        log=lambda line: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["val_loss"]) for r in records)


def test_balanced_class_weights_without_a_class_are_refused_before_anything_is_written(tiny_dir, tmp_path):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "split"])
        writer.writerows((f"w{i} w{i + 1}", ("positive", "negative")[i % 2], ("train", "test")[i % 3 == 0])
                         for i in range(30))
    with pytest.raises(ValueError, match="no examples of \\['neutral'\\]"):
        run(_cfg(tiny_dir, path, tmp_path / "run", class_weights="balanced"), log=lambda line: None)
    assert not (tmp_path / "run").exists()  # a retry is not blocked by a half-made run


def test_target_modules_flag_takes_names_all_linear_or_a_regex(tiny_dir):
    from minilora.lora import find_targets

    model = load_model(tiny_dir).model
    layers = model.config.num_layers
    def targets(flag):
        return find_targets(model, RunConfig(target_modules=flag).lora_config())

    assert len(targets("q_proj, v_proj")) == 2 * layers
    assert len(targets("all-linear")) == 7 * layers
    assert targets(r"model\.layers\.0\.self_attn\.(q|v)_proj") == ["model.layers.0.self_attn.q_proj",
                                                                  "model.layers.0.self_attn.v_proj"]
    assert targets("layers.1.mlp.up_proj") == ["model.layers.1.mlp.up_proj"]  # a dotted name is a suffix


def test_unknown_model_is_refused(tiny_csv, tmp_path):
    from minilora.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a local folder"):
        run(_cfg("no-such-model", tiny_csv, tmp_path / "run"), log=lambda line: None)


def test_labels_outside_the_label_set_are_refused(tiny_dir, tmp_path):
    from minilora.data import DataError

    path = tmp_path / "bad.csv"
    path.write_text("text,label\nw1 w2,positive\nw3,bullish\n")
    with pytest.raises(DataError, match="bullish"):
        run(_cfg(tiny_dir, path, tmp_path / "run"), log=lambda line: None)


def test_empty_data_is_refused(tiny_dir, tmp_path):
    from minilora.data import DataError

    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError):
        run(_cfg(tiny_dir, path, tmp_path / "run"), log=lambda line: None)


def test_dequantize_once_without_qlora_is_refused(tmp_path):
    with pytest.raises(RunError, match="--dequantize-once applies to NF4 weights only"):
        run(RunConfig(output_dir=str(tmp_path / "run"), dequantize_once=True))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]


def test_a_kill_between_a_checkpoint_and_its_metrics_line_loses_no_line(tiny_dir, tiny_csv, tmp_path, monkeypatch):
    """Step 3 is checkpointed and not validated; a kill before its line is appended used to lose the line
    for good (the resume started at step 4). The checkpoint keeps the record, and the resume writes it."""
    import minilora.trainer as trainer

    settings = dict(save_every=1, eval_every=2)
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "full", **settings), log=lambda line: None)
    real_write = trainer.MetricsLog.write

    def killed_before_line_3(self, record):
        if record["step"] == 3:
            raise Crash
        real_write(self, record)

    monkeypatch.setattr(trainer.MetricsLog, "write", killed_before_line_3)
    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", **settings), log=lambda line: None)
    monkeypatch.undo()
    assert [r["step"] for r in _records(tmp_path / "resumed")] == [1, 2]
    logs = []
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "resumed", resume=True, **settings), log=logs.append)
    assert any("resumed from" in line and "at step 3/4" in line for line in logs)
    assert _untimed(_records(tmp_path / "resumed")) == _untimed(_records(tmp_path / "full"))
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "resumed")
    assert all(torch.equal(resumed[key], full[key]) for key in full)


def test_a_checkpoint_of_an_older_version_still_resumes_exactly(tiny_dir, tiny_csv, tmp_path):
    """Checkpoints written before the step's record was always kept: the numpy RNG key as a numpy array
    (which the weights-only load allows) and only a validating step's record, as pending_record."""
    import numpy as np

    run(_cfg(tiny_dir, tiny_csv, tmp_path / "full"), log=lambda line: None)

    def crash_at_step_3(line):
        if line.startswith("step 3/4"):
            raise Crash

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, out), log=crash_at_step_3)
    path = out / "checkpoint" / STATE_FILE
    state = torch.load(path, weights_only=True)
    kind, keys, *position = state["rng"]["numpy"]
    state["rng"]["numpy"] = (kind, keys.numpy().astype(np.uint32), *position)
    record = state.pop("record")
    state["pending_record"] = record if state.pop("pending_validation") else None
    torch.save(state, path)
    run(_cfg(tiny_dir, tiny_csv, out, resume=True), log=lambda line: None)
    assert _untimed(_records(out)) == _untimed(_records(tmp_path / "full"))
    full, resumed = _adapter(tmp_path / "full"), _adapter(out)
    assert all(torch.equal(resumed[key], full[key]) for key in full)


def test_an_older_state_under_numpy_1_names_loads_and_allows_numpy_for_that_load_only(tmp_path):
    """A checkpoint of an older version pickled the numpy RNG key as an array, under numpy 1's module name
    when written with numpy 1; allowing numpy for it must not allow it in the user's own torch.load calls."""
    import io

    import numpy as np

    from minilora.run_state import load_state

    def users_own_load() -> str:
        buffer = io.BytesIO()
        torch.save({"array": np.arange(3, dtype=np.uint32)}, buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
            return "loaded"
        except Exception:  # torch's UnpicklingError: numpy is not allowed by default
            return "refused"

    state = {"step": 1, "optimizer": {}, "adapter": {}, "best": {}, "rng": {"numpy": np.random.get_state()}}
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)  # one pickle: its names can be edited
    assert b"numpy._core.multiarray" in buffer.getvalue()
    (tmp_path / STATE_FILE).write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    before = users_own_load()
    keys = load_state(tmp_path)["rng"]["numpy"][1]
    assert np.array_equal(keys, state["rng"]["numpy"][1])
    assert before == users_own_load() == "refused"


class Evil:
    """Any object a training state never holds: only torch's full unpickler would build it."""


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "a foreign object"])
def test_an_unreadable_training_state_is_one_line_naming_the_file(tiny_dir, tiny_csv, tmp_path, damage):
    out = tmp_path / "run"
    settings = dict(max_steps=2, eval_every=0, save_every=1)
    run(_cfg(tiny_dir, tiny_csv, out, **settings), log=lambda line: None)
    path = out / "checkpoint" / STATE_FILE
    content = {"empty": b"", "truncated": path.read_bytes()[:2000], "garbage": b"hello\n"}.get(damage)
    if content is None:
        torch.save({"step": 2, "optimizer": Evil()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(RunError, match=f"{path} (is unreadable|holds no training state) .*; delete "
                                       f"{out / 'checkpoint'} and --resume restarts the run from step 0") as error:
        run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=lambda line: None)
    assert "\n" not in str(error.value)
    shutil.rmtree(out / "checkpoint")  # what the message says to do
    logs = []
    run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=logs.append)
    assert any("starts at step 0" in line for line in logs)
    assert [r["step"] for r in _records(out)] == [1, 2]


@pytest.mark.parametrize("error", ["safetensors", "os"])
def test_a_full_disk_during_a_checkpoint_names_it_and_leaves_no_temp_folder(tiny_dir, tiny_csv, tmp_path,
                                                                            monkeypatch, error):
    import errno
    import os

    import minilora.run_state as run_state
    from safetensors import SafetensorError

    real_save = run_state.save_adapter

    def full_disk_at_the_second_checkpoint(model, folder, **kwargs):
        real_save(model, folder, **kwargs)  # partial files in the temp folder
        if folder.name == "checkpoint.tmp" and (folder.parent / "checkpoint").exists():
            raise (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                   if error == "safetensors" else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(run_state, "save_adapter", full_disk_at_the_second_checkpoint)
    out = tmp_path / "run"
    with pytest.raises(OSError, match=rf"{out / 'checkpoint'}: the checkpoint could not be written \(disk full\?\)"):
        run(_cfg(tiny_dir, tiny_csv, out, eval_every=0), log=lambda line: None)
    assert not (out / "checkpoint.tmp").exists()
    assert run_state.last_checkpoint_step(out / "checkpoint") == 2  # the previous checkpoint is whole


def _argv(tiny_dir, tiny_csv, out, **overrides) -> list[str]:
    """_cfg's settings as train.py's flags."""
    from dataclasses import fields

    cfg, argv = _cfg(tiny_dir, tiny_csv, out, **overrides), []
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def test_a_failed_safetensors_write_is_one_line_from_the_command(tiny_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    import minilora.finetune as finetune
    from minilora.cli import train as train_command
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(finetune, "save_adapter", full_disk)  # the final adapter
    assert train_command(_argv(tiny_dir, tiny_csv, tmp_path / "run", max_steps=1, eval_every=0)) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: Error while serializing: I/O error: No space left on device (os error 28)"]


@pytest.mark.parametrize("signal_name,at_step", [("SIGINT", 3), ("SIGTERM", 3), ("SIGINT", 1)])
def test_an_interrupted_run_says_in_one_line_where_its_checkpoint_is(tiny_dir, tiny_csv, tmp_path, monkeypatch,
                                                                    capsys, signal_name, at_step):
    import signal

    import minilora.trainer as trainer
    from minilora.cli import train as train_command

    real, calls = trainer.accumulate_gradients, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            if signal_name == "SIGINT":
                raise KeyboardInterrupt  # what Ctrl-C raises
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "SIGTERM would end the run without a word"
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "accumulate_gradients", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    try:
        code = train_command(_argv(tiny_dir, tiny_csv, out))  # a checkpoint every 2 steps
    except KeyboardInterrupt:
        pytest.fail("the interruption ended the command with a traceback")
    assert code == 130
    expected = (f"interrupted; the last checkpoint (step 2) is in {out / 'checkpoint'}: continue with --resume"
                if at_step == 3 else f"interrupted; no checkpoint yet in {out / 'checkpoint'}")
    assert capsys.readouterr().err.splitlines() == [expected]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_process_cannot_train_into_the_same_folder(tiny_dir, tiny_csv, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    from minilora.run_folder import LOCK_FILE

    out = tmp_path / "run"
    settings = dict(max_steps=2, eval_every=0)
    run(_cfg(tiny_dir, tiny_csv, out, **settings), log=lambda line: None)
    files = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != LOCK_FILE)
    with (out / LOCK_FILE).open("a+") as held:  # what the process training into `out` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        for second in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(RunError, match=rf"another process is training into {out} \(pid 4242\)"):
                run(_cfg(tiny_dir, tiny_csv, out, **settings, **second), log=lambda line: None)
            assert sorted((p.relative_to(out), p.stat().st_mtime_ns)
                          for p in out.rglob("*") if p.name != LOCK_FILE) == files, second
    logs = []  # the lock is released: the run goes on
    run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=logs.append)
    assert any("resumed from" in line for line in logs)


def test_relative_paths_resume_from_another_working_directory(tiny_dir, tiny_csv, tmp_path, monkeypatch):
    """run_config.json records the working directory: the same files reached by other paths resume, and
    the same relative paths naming other files from elsewhere are refused."""
    for folder in ("first", "elsewhere"):
        shutil.copytree(tiny_dir, tmp_path / folder / "model")
        shutil.copy(tiny_csv, tmp_path / folder / "rows.csv")
    out = tmp_path / "run"

    def crash_at_step_3(line):
        if line.startswith("step 3/4"):
            raise Crash

    monkeypatch.chdir(tmp_path / "first")
    with pytest.raises(Crash):
        run(_cfg("model", "rows.csv", out), log=crash_at_step_3)
    monkeypatch.chdir(tmp_path / "elsewhere")
    first, elsewhere = (tmp_path / "first").resolve(), (tmp_path / "elsewhere").resolve()
    with pytest.raises(RunError, match=f"model was '{first}/model', now '{elsewhere}/model', "
                                       f"data was '{first}/rows.csv', now '{elsewhere}/rows.csv'"):
        run(_cfg("model", "rows.csv", out, resume=True), log=lambda line: None)
    monkeypatch.chdir(tmp_path)
    logs = []
    run(_cfg("first/model", str(tmp_path / "first" / "rows.csv"), out, resume=True), log=logs.append)
    assert any("resumed from" in line and "at step 2/4" in line for line in logs)


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_model_loads(tiny_dir, tiny_csv, tmp_path,
                                                                                   monkeypatch):
    import errno
    import importlib
    import os

    import minilora.finetune as finetune

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was found read-only")

    monkeypatch.setattr(finetune, "build_model", no_model)
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes there anyway: the probe meets a read-only mount instead
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(importlib.import_module("minilora.run_folder"), "TemporaryFile", read_only)
    for out in (folder, folder / "run"):  # the folder itself, or the nearest one above it that exists
        with pytest.raises(RunError, match=rf"--output-dir {out}: cannot write in {folder} \("):
            run(_cfg(tiny_dir, tiny_csv, out), log=lambda line: None)
    folder.chmod(0o755)


def test_sigterm_handling_ends_with_the_default_when_the_previous_handler_was_not_pythons(monkeypatch):
    """signal.signal returns None for a handler an embedding program set: putting None back raised TypeError."""
    import signal

    from minilora.cli import _sigterm_as_interrupt

    real, installed = signal.signal, []

    def recording(signum, handler):
        installed.append(handler)
        previous = real(signum, handler)
        return None if len(installed) == 1 else previous

    monkeypatch.setattr(signal, "signal", recording)
    try:
        with _sigterm_as_interrupt():
            pass
    finally:
        real(signal.SIGTERM, signal.SIG_DFL)
    assert installed[-1] is signal.SIG_DFL


def test_a_resume_puts_back_the_best_adapter_of_its_own_trajectory(tiny_dir, tiny_csv, tmp_path, monkeypatch):
    """best/ written after the last checkpoint, by steps the resume redoes: when those steps do not repeat bit
    for bit (another --device), best/ kept the discarded trajectory's adapter. Scripted scores stand in for
    that difference: 0.9 at step 4 before the crash, 0.4 at step 4 after it."""
    import minilora.finetune as finetune

    settings = dict(max_steps=8, save_every=3, eval_every=2)

    def scripted(scores):
        calls = iter(scores)
        return lambda *args, **kwargs: {"loss": 1.0, "accuracy": next(calls)}

    monkeypatch.setattr(finetune, "validation_scores", scripted([0.5, 0.4, 0.45, 0.3]))
    run(_cfg(tiny_dir, tiny_csv, tmp_path / "straight", **settings), log=lambda line: None)  # best: step 2

    def crash_at_step_5(line):
        if line.startswith("step 5/8"):
            raise Crash

    monkeypatch.setattr(finetune, "validation_scores", scripted([0.5, 0.9]))
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, out, **settings), log=crash_at_step_5)
    from safetensors.torch import load_file

    interrupted_best = load_file(out / "best" / "adapter_model.safetensors")
    monkeypatch.setattr(finetune, "validation_scores", scripted([0.4, 0.45, 0.3]))  # from step 4 on
    run(_cfg(tiny_dir, tiny_csv, out, resume=True, **settings), log=lambda line: None)
    straight = load_file(tmp_path / "straight" / "best" / "adapter_model.safetensors")
    resumed = load_file(out / "best" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)  # step 2's, as the run's record says
    assert not all(torch.equal(resumed[key], interrupted_best[key]) for key in straight)


def test_resume_refuses_a_step_plan_that_changed(tiny_dir, tiny_csv, tmp_path):
    """The same flags can plan another number of steps in another minilora version (fractional epochs were
    rounded otherwise): the rest of the run would follow another learning-rate schedule."""
    out = tmp_path / "run"

    def crash_at_step_3(line):
        if line.startswith("step 3/4"):
            raise Crash

    with pytest.raises(Crash):
        run(_cfg(tiny_dir, tiny_csv, out), log=crash_at_step_3)
    path = out / "checkpoint" / STATE_FILE
    state = torch.load(path, weights_only=True)
    assert state["total_steps"] == 4
    torch.save({**state, "total_steps": 5}, path)
    with pytest.raises(RunError, match=r"--resume: the run in .* planned 5 steps and would now plan 4"):
        run(_cfg(tiny_dir, tiny_csv, out, resume=True), log=lambda line: None)
