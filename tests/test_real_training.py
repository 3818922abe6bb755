"""The main job on the real packaged Gemma 3 270M, shortened to a few steps: train.py, then eval.py
with the merge re-evaluation (LoRA and QLoRA)."""

import json

import pytest

import eval as eval_cli
import train as train_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_train_then_eval_on_gemma_270m(qlora, phrasebank_zip, packaged_folder, tmp_path):
    packaged_folder("gemma-3-270m")
    out = tmp_path / "run"
    args = ["--model", "gemma-3-270m", "--data", str(phrasebank_zip), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4", "--eval-every", "1", "--save-every", "1", "--val-limit", "6", "--eval-limit", "24"]
    assert train_cli.main(args + (["--qlora"] if qlora else [])) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["n_examples"] == 24 and 0.0 <= report["metrics"]["accuracy"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("val_accuracy" in r for r in records)

    eval_out = tmp_path / "eval"
    assert eval_cli.main(["--model", "gemma-3-270m", "--adapter", str(out / "adapter"), "--data", str(phrasebank_zip),
                          "--limit", "24", "--check-merge", "--no-baseline", "--output-dir", str(eval_out)]
                         + (["--qlora"] if qlora else [])) == 0
    merge = json.loads((eval_out / "comparison.json").read_text())["merge_check"]["adapter"]
    assert merge["rows_with_different_prediction"] == 0, merge
