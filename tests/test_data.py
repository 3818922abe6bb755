"""Data loading: the real FinancialPhraseBank numbers, parsing errors, leak-free splits, hub fallback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

import minilora.data as data
from minilora.data import (
    DataError,
    Example,
    balanced_order,
    class_weights,
    load_dataset,
    read_phrasebank,
    read_table,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data/financial_phrasebank"
ZIP = SHARED / "FinancialPhraseBank-v1.0.zip"
REPO_ROOT = Path(__file__).resolve().parents[1]
needs_zip = pytest.mark.skipif(not ZIP.is_file(), reason=f"FinancialPhraseBank zip not found at {ZIP}")


def _texts(examples):
    return {e.text for e in examples}


def _write_txt(path: Path, lines: list[str]) -> Path:
    path.write_bytes("\r\n".join(lines + [""]).encode("latin-1"))  # latin-1 + CRLF like the release
    return path


def _synthetic(path: Path, per_class: dict[str, int]) -> Path:
    lines = [f"Sentence {label} {i} , with @ sign .@{label}" for label, n in per_class.items() for i in range(n)]
    return _write_txt(path, lines)


# ---------------------------------------------------------------- the real data


@needs_zip
def test_zip_and_members_match_sha256sums():
    expected = dict(reversed(line.split()) for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert hashlib.sha256(ZIP.read_bytes()).hexdigest() == expected[ZIP.name]
    with zipfile.ZipFile(ZIP) as archive:
        for name, digest in expected.items():
            if name != ZIP.name:
                assert hashlib.sha256(archive.read(name)).hexdigest() == digest, name


@needs_zip
def test_50agree_counts_and_dedupe():
    rows = read_phrasebank(ZIP)  # agreement defaults to 50
    assert len(rows.examples) == 4846 and not rows.bad_rows
    assert Counter(e.label for e in rows.examples) == {"neutral": 2879, "positive": 1363, "negative": 604}
    splits = load_dataset(ZIP, protocol="seed")
    info = splits.info
    assert (info.n_read, info.n_duplicates, info.n_conflicts, info.n_unique) == (4846, 6, 2, 4838)
    assert info.conflict_policy == data.CONFLICT_POLICY
    assert ":79 has 'neutral'" in info.conflicts[0] and ":789 has 'positive'" in info.conflicts[1]
    assert info.sha256 == hashlib.sha256(ZIP.read_bytes()).hexdigest()
    assert json.loads(json.dumps(asdict(info)))["n_unique"] == 4838  # saved beside the outputs


@needs_zip
@pytest.mark.parametrize(
    "agreement, n_read, n_unique", [("66", 4217, 4211), ("75", 3453, 3448), ("all", 2264, 2259)]
)
def test_other_agreements(agreement, n_read, n_unique):
    info = load_dataset(ZIP, agreement=agreement, protocol="standard").info
    assert (info.n_read, info.n_unique, info.n_conflicts, info.agreement) == (n_read, n_unique, 0, agreement)


@needs_zip
def test_seed_protocol_real_sizes():
    splits = load_dataset(ZIP, protocol="seed", seed=42)
    counts = splits.info.split_counts
    assert counts["train"] == {"positive": 300, "neutral": 300, "negative": 300}
    assert counts["test"] == {"positive": 300, "neutral": 300, "negative": 300}
    assert counts["validation"] == {"positive": 762, "neutral": 2272, "negative": 4}  # the pitfall
    assert len(splits.train) == len(splits.test) == 900 and len(splits.validation) == 3038


@needs_zip
def test_standard_protocol_real_sizes():
    splits = load_dataset(ZIP, protocol="standard", seed=42)
    counts = splits.info.split_counts
    assert len(splits.test) == 1212  # ceil(0.25 * 4846), the FinBERT-table size
    assert counts["test"] == {"positive": 341, "neutral": 720, "negative": 151}
    assert counts["validation"] == {"positive": 102, "neutral": 216, "negative": 45}  # ceil(0.1 * 3626)
    assert counts["train"] == {"positive": 919, "neutral": 1936, "negative": 408}
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 4838


@needs_zip
@pytest.mark.parametrize("protocol", ["seed", "standard"])
def test_splits_disjoint_and_deterministic(protocol):
    a = load_dataset(ZIP, protocol=protocol, seed=7)
    b = load_dataset(ZIP, protocol=protocol, seed=7)
    c = load_dataset(ZIP, protocol=protocol, seed=8)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert a.test != c.test
    test = _texts(a.test)
    assert not test & _texts(a.train) and not test & _texts(a.validation)
    assert not _texts(a.train) & _texts(a.validation)


@needs_zip
def test_folder_and_txt_sources_match_zip(tmp_path):
    with zipfile.ZipFile(ZIP) as archive:
        archive.extractall(tmp_path)
    from_zip = read_phrasebank(ZIP, agreement="75").examples
    assert read_phrasebank(tmp_path, agreement="75").examples == from_zip
    assert read_phrasebank(tmp_path / "FinancialPhraseBank-v1.0", agreement="75").examples == from_zip
    txt = tmp_path / "FinancialPhraseBank-v1.0/Sentences_75Agree.txt"
    assert read_phrasebank(txt).examples == from_zip
    with pytest.raises(DataError, match="agreement 75"):
        read_phrasebank(txt, agreement="50")


# ---------------------------------------------------------------- parsing and errors


def test_split_on_last_at_and_normalise_label(tmp_path):
    path = _write_txt(tmp_path / "s.txt", ["Mail me @ home .@Positive", "Flat sales .@ neutral "])
    rows = read_phrasebank(path)
    assert rows.examples == [Example("Mail me @ home .", "positive"), Example("Flat sales .", "neutral")]


def test_bad_rows_raise_with_file_and_line(tmp_path):
    path = _write_txt(tmp_path / "s.txt", ["Good .@positive", "no separator here", "@negative"])
    with pytest.raises(DataError) as err:
        read_phrasebank(path)
    message = str(err.value)
    assert "2 bad row(s)" in message and f"{path}:2: no '@'" in message and f"{path}:3: empty sentence" in message
    rows = read_phrasebank(path, skip_bad_rows=True)
    assert rows.examples == [Example("Good .", "positive")] and len(rows.bad_rows) == 2


def test_unknown_label_names_file_line_value_and_allowed(tmp_path):
    path = _write_txt(tmp_path / "s.txt", ["Good .@positive", "Meh .@mixed"])
    allowed = r"\['positive', 'neutral', 'negative'\]"
    with pytest.raises(DataError, match=rf"s\.txt:2: label 'mixed' is not in the label set {allowed}"):
        read_phrasebank(path)
    assert len(read_phrasebank(path, skip_bad_rows=True).bad_rows) == 1


def test_empty_and_all_invalid_data_raise(tmp_path):
    with pytest.raises(DataError, match="no valid rows"):
        read_phrasebank(_write_txt(tmp_path / "empty.txt", []))
    with pytest.raises(DataError, match="no valid rows"):
        read_phrasebank(_write_txt(tmp_path / "bad.txt", ["x", "y"]), skip_bad_rows=True)
    with pytest.raises(DataError, match="not found"):
        read_phrasebank(tmp_path / "missing.zip")


def test_duplicates_and_conflicts_counted(tmp_path):
    lines = [f"p{i} .@positive" for i in range(4)] + [f"n{i} .@neutral" for i in range(4)]
    lines += [f"m{i} .@negative" for i in range(4)]
    lines += ["p0 .@positive", "p0 .@positive", "n0 .@negative"]  # 2 duplicates, 1 conflict
    path = _write_txt(tmp_path / "s.txt", lines)
    splits = load_dataset(path, protocol="seed", train_per_class=2, test_per_class=1)
    info = splits.info
    assert (info.n_read, info.n_duplicates, info.n_conflicts, info.n_unique) == (15, 2, 1, 12)
    assert "label 'negative' dropped" in info.conflicts[0] and ":5 has 'neutral'" in info.conflicts[0]
    assert info.split_counts["validation"] == {"positive": 1, "neutral": 1, "negative": 1}


def test_class_too_small_raises(tmp_path):
    path = _synthetic(tmp_path / "s.txt", {"positive": 5, "neutral": 5, "negative": 3})
    with pytest.raises(DataError, match="class 'negative' has 3 rows.*2 \\+ 2 = 4"):
        load_dataset(path, train_per_class=2, test_per_class=2)


@pytest.mark.parametrize("setting,message", [
    (dict(train_per_class=-1), r"train_per_class \(--train-per-class\): found -1, expected >= 1"),
    (dict(test_per_class=0), r"test_per_class \(--test-per-class\): found 0"),
    (dict(protocol="standard", validation_fraction=-0.1), r"validation_fraction: found -0.1, expected .* \[0, 1\)"),
    (dict(protocol="standard", validation_fraction=1.0), r"validation_fraction: found 1.0"),
    (dict(protocol="standard", test_fraction=-0.1), r"test_fraction: found -0.1, expected .* \(0, 1\)"),
])
def test_counts_and_fractions_out_of_range_are_named(tmp_path, setting, message):
    """A negative count or fraction used to swap what is picked and what is left (or read as a leak)."""
    path = _synthetic(tmp_path / "s.txt", {"positive": 20, "neutral": 20, "negative": 20})
    with pytest.raises(DataError, match=message):
        load_dataset(path, **{"train_per_class": 2, "test_per_class": 2, **setting})


def test_standard_split_on_synthetic(tmp_path):
    path = _synthetic(tmp_path / "s.txt", {"positive": 40, "neutral": 100, "negative": 20})
    splits = load_dataset(path, protocol="standard", seed=3)
    counts = splits.info.split_counts
    assert counts["test"] == {"positive": 10, "neutral": 25, "negative": 5}  # 25% of 160
    assert sum(counts["validation"].values()) == 12  # ceil(0.1 * 120)
    assert sum(map(len, (splits.train, splits.validation, splits.test))) == 160


def test_csv_with_commas_quotes_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"Profit rose, ""sharply"" .",POSITIVE\nFlat .,neutral\n', encoding="utf-8")
    expected = [Example('Profit rose, "sharply" .', "positive"), Example("Flat .", "neutral")]
    assert read_table(csv_path).examples == expected
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "Loss widened .", "label": "negative"}) + "\n\n", encoding="utf-8")
    assert read_table(jsonl).examples == [Example("Loss widened .", "negative")]
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nx,positive\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected 'text' and 'label'"):
        read_table(bad)


def test_table_bad_rows_name_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok .", "label": "neutral"}\nnot json\n{"text": "", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_table(path)
    assert len(read_table(path, skip_bad_rows=True).bad_rows) == 2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_that_is_not_utf8_names_its_line(tmp_path, suffix):
    rows = ['text,label', 'ok .,neutral', 'Caf\u00e9 sales rose .,positive'] if suffix == ".csv" else [
        '{"text": "ok .", "label": "neutral"}', '{"text": "Caf\u00e9 sales rose .", "label": "positive"}']
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(DataError, match=rf"latin1\{suffix}: not UTF-8 text at line 3 .*xe9.*save the file as UTF-8"
                       if suffix == ".csv" else rf"latin1\{suffix}: not UTF-8 text at line 2 "):
        read_table(path)


def test_csv_records_are_located_by_their_first_line_and_unreadable_ones_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nok .,neutral\n"two\nlines",positive\nstray " quote,negative\n'
                    'a,positive\nb,negative\n"open quote,positive\nc,neutral\nd,neutral\n')
    with pytest.raises(DataError, match=r"d\.csv:8-10: field 'label' is missing"):  # from the open quote on
        read_table(path)
    rows = read_table(path, skip_bad_rows=True)
    assert [e.text for e in rows.examples] == ["ok .", "two\nlines", 'stray " quote', "a", "b"]
    assert rows.bad_rows[0].startswith(f"{path}:8-10: ")
    path.write_text("text,label\n" + "x" * 200_000 + ",positive\n")  # over csv's field size limit
    with pytest.raises(DataError, match=r"d\.csv:2: not a readable CSV record \(field larger than field limit"):
        read_table(path)


def test_jsonl_texts_keep_the_line_separators_json_leaves_unescaped(tmp_path):
    path = tmp_path / "d.jsonl"
    texts = ["Sales\u2028rose .", "Costs\u2029fell\u0085 ."]
    path.write_text("".join(json.dumps({"text": t, "label": "neutral"}, ensure_ascii=False) + "\r\n"
                            for t in texts), encoding="utf-8")
    assert [e.text for e in read_table(path).examples] == texts


def test_jsonl_integer_labels_read_as_the_same_labels_in_a_csv(tmp_path):
    jsonl, table = tmp_path / "d.jsonl", tmp_path / "d.csv"
    jsonl.write_text('{"text": "up .", "label": 2}\n{"text": "flat .", "label": 0}\n{"text": "x .", "label": true}\n')
    table.write_text("text,label\nup .,2\nflat .,0\n")
    assert read_table(jsonl, labels=("0", "1", "2"), skip_bad_rows=True).examples == \
        read_table(table, labels=("0", "1", "2")).examples == [Example("up .", "2"), Example("flat .", "0")]
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'label' is missing or not a string \(found True\)"):
        read_table(jsonl, labels=("0", "1", "2"))


def test_the_name_kept_for_unparsed_answers_cannot_be_a_label(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok .,valid\nno .,invalid\n")
    with pytest.raises(DataError, match="'invalid' is reserved for generated answers that name no label"):
        load_dataset(path, labels=("valid", "invalid"))


def test_the_bad_row_message_names_the_cli_flag(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok .,neutral\n,positive\n")
    with pytest.raises(DataError, match="pass --skip-bad-rows"):
        read_table(path)


def test_given_split_column_used_and_leak_rejected(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "text,label,split\na .,positive,train\nb .,negative,validation\nc .,neutral,test\nd .,neutral,train\n"
    )
    splits = load_dataset(path)
    assert splits.info.protocol == "given"
    assert [e.text for e in splits.test] == ["c ."] and len(splits.train) == 2 and len(splits.validation) == 1
    leak = tmp_path / "leak.csv"
    leak.write_text("text,label,split\na .,positive,train\nb .,negative,test\na .,positive,test\n")
    with pytest.raises(DataError, match=r"in both 'train' and 'test' \(leak\) \(\S*leak\.csv:2 and \S*leak\.csv:4\)"):
        load_dataset(leak)  # both rows named, so the user can find them
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label,split\na .,positive,dev\n")
    with pytest.raises(DataError, match=r"odd\.csv:2: field 'split' is 'dev'"):
        load_dataset(odd)


def test_check_disjoint_raises():
    with pytest.raises(DataError, match="leak"):
        data.check_disjoint({"train": [Example("x", "positive")], "test": [Example("x", "positive")]})


# ---------------------------------------------------------------- class imbalance


def test_class_weights_balanced_by_hand():
    examples = [Example(str(i), "neutral") for i in range(6)] + [Example("p", "positive"), Example("q", "positive")]
    examples += [Example("n", "negative")]
    weights = class_weights(examples, mode="balanced")
    assert weights == pytest.approx({"positive": 9 / (3 * 2), "neutral": 9 / (3 * 6), "negative": 9 / (3 * 1)})
    assert class_weights(examples) == {"positive": 1.0, "neutral": 1.0, "negative": 1.0}
    with pytest.raises(DataError, match="no examples of \\['negative'\\]"):
        class_weights(examples[:8], mode="balanced")


def test_balanced_order_oversamples_minorities():
    examples = [Example(f"n{i}", "neutral") for i in range(7)] + [Example(f"p{i}", "positive") for i in range(3)]
    order = balanced_order(examples, seed=1, epoch=0)
    labels = Counter(examples[i].label for i in order)
    assert labels == {"neutral": 7, "positive": 7}
    per_index = Counter(order)
    assert all(per_index[i] == 1 for i in range(7)) and sorted(per_index[i] for i in range(7, 10)) == [2, 2, 3]
    assert order == balanced_order(examples, seed=1, epoch=0)
    assert order != balanced_order(examples, seed=1, epoch=1)


# ---------------------------------------------------------------- Hugging Face Hub fallback


def _run_python(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_offline_without_cache_tells_user_to_pass_data(tmp_path):
    code = (
        "from minilora.data import load_dataset, DataError\n"
        "try:\n    load_dataset(None)\nexcept DataError as err:\n    print('ERR', err)\n"
    )
    result = _run_python(code, tmp_path / "hf_home")
    assert result.returncode == 0, result.stderr
    assert "ERR could not fetch takala/financial_phrasebank" in result.stdout and "--data PATH" in result.stdout


@needs_zip
def test_offline_with_hub_cache_loads(tmp_path):
    commit = "0" * 40
    repo = tmp_path / "hf_home/hub/datasets--takala--financial_phrasebank"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    target = repo / "snapshots" / commit / "data/FinancialPhraseBank-v1.0.zip"
    target.parent.mkdir(parents=True)
    shutil.copy(ZIP, target)
    code = "from minilora.data import load_dataset\nprint('N', load_dataset(None).info.n_unique)\n"
    result = _run_python(code, tmp_path / "hf_home")
    assert result.returncode == 0, result.stderr
    assert "N 4838" in result.stdout


@needs_zip
def test_source_none_calls_hub_with_official_arguments(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(ZIP)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    splits = load_dataset(None, protocol="standard")
    assert calls == [
        {
            "repo_id": "takala/financial_phrasebank",
            "repo_type": "dataset",
            "filename": "data/FinancialPhraseBank-v1.0.zip",
        }
    ]
    assert len(splits.test) == 1212
