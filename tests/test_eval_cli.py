"""eval.py / predict on a tiny checkpoint: side-by-side reports, merge re-evaluation, bad input."""

import csv
import json
import re
import shutil

import pytest
import torch

from minilora.adapter_io import save_adapter
from minilora.checkpoint import load_model
from minilora.compare import EvalConfig, run_comparison
from minilora.data import DataError
from minilora.generate import parse_label
from minilora.lora import LoraConfig, adapter_parameters, inject_adapters
from tests.tiny import hf_model, save_tiny_checkpoint, tiny_gemma_config, tiny_llama_config

QUIET = dict(log=lambda line: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = save_tiny_checkpoint(root / "model", hf_model(tiny_llama_config()))
    data = root / "rows.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "split"])
        for i in range(12):
            writer.writerow([f"w{i} w{i + 20}, w{i + 40}", ("positive", "neutral", "negative")[i % 3],
                             "test" if i >= 6 else "train"])
    adapters = {}
    for name, qlora in (("plain", False), ("qlora", True)):
        torch.manual_seed(0)
        model = load_model(folder).model
        if qlora:
            from minilora.quant import quantize_nf4

            quantize_nf4(model)
        inject_adapters(model, LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for p in adapter_parameters(model):
                p.normal_(0, 0.3)
        adapters[name] = save_adapter(model, root / name, base_model_name_or_path=str(folder))
    return folder, data, adapters, root


def _cfg(setup, out, **kw):
    folder, data, adapters, _ = setup
    base = dict(model=str(folder), data=str(data), adapter=[str(adapters["plain"])], output_dir=str(out))
    base.update(kw)
    return EvalConfig(**base)


def test_baseline_and_adapter_side_by_side(setup, tmp_path):
    results = run_comparison(_cfg(setup, tmp_path), **QUIET)
    assert list(results) == ["baseline", "plain"]
    for run in ("baseline", "plain"):
        for name in ("report.json", "predictions.csv", "confusion_matrix.png", "summary.md"):
            assert (tmp_path / run / name).is_file()
    table = (tmp_path / "comparison.md").read_text()
    assert "baseline" in table and "plain" in table
    with (tmp_path / "plain" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) >= {"text", "gold", "predicted", "logprob_positive", "logprob_neutral", "logprob_negative"}
    assert len(rows) == 6 and all(float(r["logprob_neutral"]) < 0 for r in rows)
    with (tmp_path / "baseline" / "predictions.csv").open() as f:
        base_rows = list(csv.DictReader(f))
    assert [r["text"] for r in base_rows] == [r["text"] for r in rows]
    assert any(abs(float(a["logprob_positive"]) - float(b["logprob_positive"])) > 1e-3 for a, b in zip(rows, base_rows))


@pytest.mark.parametrize("qlora", [False, True])
def test_merged_adapter_gives_the_same_predictions(setup, tmp_path, qlora, monkeypatch):
    import importlib

    from minilora.lora import lora_modules

    evaluate_module = importlib.import_module("minilora.evaluate")  # the package's `evaluate` is the function

    merged_during_scoring = []  # per scoring pass: were the adapters merged while it ran?
    real_scoring = evaluate_module.label_logprobs

    def spy(model, *args, **kwargs):
        merged_during_scoring.append({module.merged for _, module in lora_modules(model)})
        return real_scoring(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "label_logprobs", spy)
    adapter = setup[2]["qlora" if qlora else "plain"]
    results = run_comparison(_cfg(setup, tmp_path, adapter=[str(adapter)], baseline=False, check_merge=True,
                                  qlora=qlora), **QUIET)
    # an untimed warm-up on the base, then the reference pass with the adapters unmerged, then merged
    assert merged_during_scoring == [set(), {False}, {True}]
    name = adapter.name
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert report["merge_check"][name]["rows_with_different_prediction"] == 0
    assert results[name]["predicted"] == results[name + "-merged"]["predicted"]


def test_int8_evaluation_runs_in_int8_and_says_so(setup, tmp_path, monkeypatch):
    import importlib

    from minilora.int8 import Int8Linear

    evaluate_module = importlib.import_module("minilora.evaluate")
    int8_passes = []  # per scoring pass: did the decoder's projections run in int8?
    real_scoring = evaluate_module.label_logprobs

    def spy(model, *args, **kwargs):
        int8_passes.append(isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear))
        return real_scoring(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "label_logprobs", spy)
    for query in ("_is_vnni_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, query, lambda: False, raising=False)
    lines = []
    results = run_comparison(_cfg(setup, tmp_path, int8=True), log=lines.append)
    assert any("no VNNI / AMX" in line for line in lines)  # where int8 products are not faster, it says so
    # per run (warm-up, baseline, adapter): an fp32 pass over the calibration rows, then the rest in int8
    assert int8_passes == [False, True] * 3
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert report["meta"]["int8"] is True
    assert "int8 projections" in (tmp_path / "comparison.md").read_text()
    assert len(results["plain"]["predicted"]) == 6
    with pytest.raises(ValueError, match="--check-merge .* without --int8"):
        run_comparison(_cfg(setup, tmp_path / "again", int8=True, check_merge=True), **QUIET)


def test_an_adapter_folder_named_baseline_does_not_replace_the_baseline(setup, tmp_path):
    import shutil

    renamed = tmp_path / "x" / "baseline"
    shutil.copytree(setup[2]["plain"], renamed)
    results = run_comparison(_cfg(setup, tmp_path / "out", adapter=[str(renamed)]), **QUIET)
    assert list(results) == ["baseline", "adapter-baseline"]
    assert json.loads((tmp_path / "out" / "baseline" / "report.json").read_text())["meta"]["adapter"] is None


def test_reports_record_the_split_protocol_used(setup, tmp_path):
    run_comparison(_cfg(setup, tmp_path / "out", limit=4), **QUIET)  # the CSV's own split column
    meta = json.loads((tmp_path / "out" / "plain" / "report.json").read_text())["meta"]
    assert meta["split_protocol"] == "given"
    # and what else decides the rows and the prompts, so that a report shows what produced it
    assert (meta["data"], meta["labels"], meta["limit"], meta["prompt_template"]) == (
        str(setup[1]), ["positive", "neutral", "negative"], 4, None)


def test_generate_method_reports_invalid_answers(setup, tmp_path):
    results = run_comparison(_cfg(setup, tmp_path, adapter=[], method="generate"), **QUIET)
    metrics = results["baseline"]
    assert metrics["n"] == 6
    assert metrics["n_invalid"] + sum(p in ("positive", "neutral", "negative") for p in metrics["predicted"]) == 6
    # predictions.csv keeps each decoded answer beside the label parsed from it
    with (tmp_path / "baseline" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["text", "gold", "predicted", "generated"]
    assert [parse_label(r["generated"], ("positive", "neutral", "negative")) for r in rows] == metrics["predicted"]
    assert any(r["generated"].strip() for r in rows)


def test_adapter_for_another_base_model_is_refused(setup, tmp_path):
    other = save_tiny_checkpoint(tmp_path / "other", hf_model(tiny_gemma_config()))
    with pytest.raises(ValueError, match="adapter was trained on base model"):
        run_comparison(_cfg(setup, tmp_path / "out", model=str(other)), **QUIET)


def test_every_adapter_folder_is_checked_before_anything_is_evaluated(setup, tmp_path):
    _, _, adapters, root = setup
    run_folder = tmp_path / "run"
    shutil.copytree(adapters["plain"], run_folder / "adapter")  # a training run's output folder
    for wrong, message in ((run_folder, f"it holds a training run: pass {run_folder / 'adapter'}"),
                           (tmp_path / "missing", "adapter_config.json not found")):
        logs = []
        with pytest.raises(FileNotFoundError, match=re.escape(message)):
            run_comparison(_cfg(setup, tmp_path / "out", adapter=[str(adapters["plain"]), str(wrong)]),
                           log=logs.append)
        assert logs == [] and not (tmp_path / "out").exists()  # nothing evaluated, not even the baseline


def test_predict_refuses_an_adapter_for_another_base_in_one_line(setup, tmp_path, capsys):
    from minilora.predict import main

    folder, _, adapters, _ = setup
    other = save_tiny_checkpoint(tmp_path / "other", hf_model(tiny_llama_config(), seed=5))  # same shapes
    capsys.readouterr()  # the save's progress bar
    assert main(["--model", str(other), "--adapter", str(adapters["plain"]), "w1 w2"]) == 2
    assert capsys.readouterr().err.startswith("error: adapter was trained on base model")
    assert main(["--model", str(folder), "--adapter", str(tmp_path / "missing"), "w1 w2"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_check_merge_gives_each_next_adapter_the_original_base(setup, tmp_path):
    """Unmerging in place leaves rounding drift (1e-3 in bf16); a later adapter must not see it."""
    plain = str(setup[2]["plain"])
    run_comparison(_cfg(setup, tmp_path / "solo", baseline=False, dtype="bf16"), **QUIET)
    both = run_comparison(_cfg(setup, tmp_path / "both", adapter=[plain, plain], baseline=False, dtype="bf16",
                               check_merge=True), **QUIET)
    assert set(both) == {"adapter1-plain", "adapter1-plain-merged", "adapter2-plain", "adapter2-plain-merged"}

    def logprobs(folder):
        with (folder / "predictions.csv").open() as f:
            return [[float(v) for k, v in row.items() if k.startswith("logprob_")] for row in csv.DictReader(f)]

    assert logprobs(tmp_path / "both" / "adapter2-plain") == logprobs(tmp_path / "solo" / "plain")


def test_adapter_with_other_shapes_is_refused(setup, tmp_path):
    folder, data, adapters, _ = setup
    other = save_tiny_checkpoint(tmp_path / "model", hf_model(tiny_llama_config(hidden_size=32)))
    with pytest.raises(ValueError, match="has shape .* the model expects"):
        run_comparison(_cfg(setup, tmp_path / "out", model=str(other)), **QUIET)


def test_empty_data_file_is_refused(setup, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError):
        run_comparison(_cfg(setup, tmp_path / "out", data=str(empty)), **QUIET)


def test_skip_bad_rows_drops_them(setup, tmp_path):
    data = tmp_path / "rows.csv"
    data.write_text(setup[1].read_text() + ",neutral,test\n")  # an empty text
    with pytest.raises(DataError, match="1 bad row"):
        run_comparison(_cfg(setup, tmp_path / "out", data=str(data)), **QUIET)
    results = run_comparison(_cfg(setup, tmp_path / "out", data=str(data), skip_bad_rows=True), **QUIET)
    assert results["plain"]["n"] == 6


def test_a_batch_size_below_one_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match=r"--batch-size\) must be >= 1, found 0"):
        run_comparison(_cfg(setup, tmp_path / "out", batch_size=0), **QUIET)


def test_unknown_label_is_refused(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w1", "label": "bullish"}) + "\n")
    with pytest.raises(DataError, match="bullish"):
        run_comparison(_cfg(setup, tmp_path / "out", data=str(bad)), **QUIET)


def test_a_label_set_of_two_is_evaluated_over_those_two(setup, tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{i} w{i + 20}", "label": ("positive", "negative")[i % 2],
                                        "split": "test"}) + "\n" for i in range(8)))
    logs = []
    results = run_comparison(_cfg(setup, tmp_path / "out", data=str(data), labels="positive,negative"),
                             log=logs.append)
    report = json.loads((tmp_path / "out" / "plain" / "report.json").read_text())
    assert list(report["metrics"]["per_class"]) == ["positive", "negative"]
    assert results["plain"]["n"] == 8 and any("note: labels ['positive', 'negative']" in line for line in logs)
    with pytest.raises(DataError, match="--labels: found 'positive', expected two or more"):
        run_comparison(_cfg(setup, tmp_path / "out", data=str(data), labels="positive"), **QUIET)


def test_a_negative_limit_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match=r"--limit must be >= 0 \(0: all rows\), found -5"):
        run_comparison(_cfg(setup, tmp_path / "out", limit=-5), **QUIET)


def test_predict_reads_stdin_without_its_byte_order_mark(setup, capsys, monkeypatch):
    import io

    from minilora.predict import main

    folder, _, adapters, _ = setup
    assert main(["--model", str(folder), "w1 w2"]) == 0
    expected = json.loads(capsys.readouterr().out)
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffw1 w2\r\n\nw1 w2\n"))
    assert main(["--model", str(folder)]) == 0
    first, blank, third = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first == expected == third  # the same text, so the same probabilities
    assert blank == {"text": "", "label": None, "probabilities": None}  # output line i answers input line i


def test_predict_names_a_stdin_line_that_is_not_utf8_before_loading_anything(setup, capsys, monkeypatch):
    """FinancialPhraseBank's own files are latin-1: piped in, they were a tokenizer traceback and no output."""
    import io

    from minilora.predict import main

    folder, _, _, _ = setup
    stdin = io.TextIOWrapper(io.BytesIO("w1 w2\n".encode() + "w3 caf\u00e9\n".encode("latin-1")), encoding="ascii",
                             errors="surrogateescape")  # as a C locale reads it
    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr("minilora.finetune.build_model", lambda *a: pytest.fail("loaded the model first"))
    assert main(["--model", str(folder)]) == 2
    assert "stdin line 2 is not UTF-8 (byte b'\\xe9' at column 7); convert it first" in capsys.readouterr().err
    assert main(["--model", str(folder), "w1 \udce9"]) == 2  # an argument the locale could not decode
    assert "argument 1 is not valid UTF-8 text (at column 4)" in capsys.readouterr().err


def test_predict_cli_prints_label_and_probabilities(setup, capsys):
    from minilora.predict import main

    folder, _, adapters, _ = setup
    assert main(["--model", str(folder), "--adapter", str(adapters["plain"]), "w1 w2", "w3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["w1 w2", "w3"]
    for line in lines:
        assert line["label"] in ("positive", "neutral", "negative")
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert max(line["probabilities"], key=line["probabilities"].get) == line["label"]
    assert main(["--model", str(folder), "--labels", "Positive,negative", "w1 w2"]) == 0
    assert list(json.loads(capsys.readouterr().out)["probabilities"]) == ["positive", "negative"]
    assert main(["--model", str(folder), "--labels", "positive,positive", "w1 w2"]) == 2
    assert "--labels: found 'positive,positive'" in capsys.readouterr().err


def test_an_adapter_is_not_evaluated_on_the_rows_its_run_trained_on(setup, tmp_path):
    """eval.py's defaults (--seed 42, the seed protocol) split another run's data otherwise: 28 of 45 "test"
    rows were a probe's adapter's training rows, with no word said."""
    import hashlib
    import json
    import shutil

    folder, _, adapters, _ = setup
    data = tmp_path / "unsplit.csv"
    data.write_text("text,label\n" + "".join(f"w{i} w{i + 30},{('positive', 'neutral', 'negative')[i % 3]}\n"
                                             for i in range(24)))
    run = tmp_path / "run"
    shutil.copytree(adapters["plain"], run / "adapter")
    (run / "run_config.json").write_text(json.dumps({
        "data": data.name, "cwd": str(tmp_path), "split_protocol": "standard", "seed": 7, "agreement": "50",
        "train_per_class": 300, "test_per_class": 300, "labels": "positive,neutral,negative",
        "skip_bad_rows": False, "prompt_format": "auto", "qlora": False, "prompt_tokens_sha256": "0" * 64}))
    settings = dict(data=str(data), adapter=[str(run / "adapter")], split_protocol="standard", baseline=False)
    refused = r"of the 6 test rows are training rows of .*run/adapter, whose run split its data with protocol " \
              r"standard and seed 7"
    with pytest.raises(ValueError, match=refused):
        run_comparison(_cfg(setup, tmp_path / "out", **settings), **QUIET)
    lines = []
    run_comparison(_cfg(setup, tmp_path / "out", seed=7, labels=" Positive, neutral,negative", **settings),
                   log=lines.append)  # the run's own split; the same label set, spelled otherwise
    assert any("was trained on other prompt or label tokens than this evaluation's" in line for line in lines)
    assert not any("was trained with the labels" in line for line in lines)

    # the run's data recorded by its sha256: the same file elsewhere is checked, an edited one is named
    (run / "data_info.json").write_text(json.dumps({"sha256": hashlib.sha256(data.read_bytes()).hexdigest()}))
    moved = tmp_path / "moved.csv"
    data.rename(moved)
    with pytest.raises(ValueError, match=refused):
        run_comparison(_cfg(setup, tmp_path / "out", **{**settings, "data": str(moved)}), **QUIET)
    shutil.copy(moved, data)
    with data.open("a") as f:
        f.write("w90 w91,positive\n")
    lines = []  # the edited file: its split is another, and the run's rows cannot be rebuilt from it
    run_comparison(_cfg(setup, tmp_path / "out", **settings), log=lines.append)
    assert any("unsplit.csv, which" in line and "changed since" in line for line in lines)
