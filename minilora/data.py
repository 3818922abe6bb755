"""Data: FinancialPhraseBank (or a CSV / JSONL of text,label) -> deduplicated, leak-free splits.

Pipeline, one function per step:

    read_phrasebank / read_table   rows with their "file:line" origin, bad rows collected
    deduplicate                    drop exact (text, label) repeats; one label per text
    split_seed / split_standard    deterministic splits from a seed (or the file's own split column)
    check_disjoint                 no text in two splits, asserted on every path

Two split protocols:

* "seed": N per class for train and for test (default 300 / 300), the rest is validation. This is
  the balanced split of the seed notebooks; on 50Agree it leaves only 4 negative sentences for
  validation and is not comparable with published tables.
* "standard": stratified 75 / 25 train / test, validation carved (stratified) from train. The
  test size is ceil(0.25 * rows read), i.e. what sklearn's ``train_test_split(test_size=0.25)``
  gives on the raw file: 1,212 for 50Agree, the size FinBERT / FinGPT tables report. The rows
  themselves are drawn from the deduplicated data, so no sentence can straddle test and train.

Conflicting labels (the same sentence twice with different labels; 2 in 50Agree, 0 elsewhere):
the first occurrence in file order is kept, the others are counted and listed in ``info``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_LABELS = ("positive", "neutral", "negative")
INVALID_LABEL = "invalid"  # what a generated answer that names no label is recorded as (metrics.py)
AGREEMENTS = {"50": "50Agree", "66": "66Agree", "75": "75Agree", "all": "AllAgree"}
ZIP_NAME = "FinancialPhraseBank-v1.0.zip"
ZIP_DIR = "FinancialPhraseBank-v1.0"
HF_REPO_ID = "takala/financial_phrasebank"
HF_FILENAME = "data/FinancialPhraseBank-v1.0.zip"
SPLIT_NAMES = ("train", "validation", "test")
CONFLICT_POLICY = "keep the first occurrence in file order"


class DataError(ValueError):
    """Input data we cannot turn into a correct dataset; the message names file, line and value."""


@dataclass(frozen=True)
class Example:
    """One labelled sentence."""

    text: str
    label: str  # lowercase, one of the label set


@dataclass
class Rows:
    """Rows read from one source, before dedupe; parallel lists keep each row's origin."""

    examples: list[Example] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file:line", for error messages
    splits: list[str | None] = field(default_factory=list)  # from a `split` column, else None
    bad_rows: list[str] = field(default_factory=list)  # "file:line: reason" for each skipped row
    source: str = ""  # what was read: the file, or zip:member
    path: str = ""  # the file on disk that was read (hashed into DataInfo.sha256)


@dataclass
class DataInfo:
    """What was read and how it was split; saved beside the outputs."""

    source: str
    sha256: str  # of the file read (the zip, the .txt, the CSV / JSONL)
    agreement: str | None  # 50 | 66 | 75 | all, None for CSV / JSONL
    protocol: str  # seed | standard | given (split column in the file)
    seed: int
    labels: tuple[str, ...]
    n_read: int  # valid rows read, before dedupe
    n_bad_rows: int  # skipped because skip_bad_rows=True
    bad_rows: list[str]
    n_duplicates: int  # exact (text, label) repeats dropped
    n_conflicts: int  # rows dropped because their text already had another label
    conflicts: list[str]
    conflict_policy: str
    n_unique: int  # rows left after dedupe
    split_counts: dict[str, dict[str, int]]  # split -> label -> rows


@dataclass
class DatasetSplits:
    """Train / validation / test examples plus how they were made."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    info: DataInfo


# ---------------------------------------------------------------- reading


def _normalise_agreement(agreement: str | int) -> str:
    key = str(agreement).strip().lower().removesuffix("agree")
    if key in ("100",):
        key = "all"
    if key not in AGREEMENTS:
        raise DataError(f"agreement: found {agreement!r}, expected one of 50, 66, 75, all")
    return key


def parse_label_set(text: str, flag: str = "--labels") -> tuple[str, ...]:
    """A comma-separated label set as the command lines take it: stripped and lower-cased (as rows'
    labels are read), at least two, none repeated."""
    labels = tuple(label.strip().lower() for label in text.split(","))
    if any(not label for label in labels) or len(labels) < 2 or len(set(labels)) < len(labels):
        raise DataError(f"{flag}: found {text!r}, expected two or more different comma-separated labels, "
                        f"e.g. {','.join(DEFAULT_LABELS)!r}")
    return labels


def _parse_label(value: str, labels: tuple[str, ...]) -> tuple[str | None, str | None]:
    """Return (label, None) or (None, reason) for a raw label value."""
    label = value.strip().lower()
    if label not in labels:
        return None, f"label {value!r} is not in the label set {list(labels)}"
    return label, None


def _finish(rows: Rows, skip_bad_rows: bool) -> Rows:
    """Raise on bad rows unless asked to skip them; raise on no valid rows at all."""
    if rows.bad_rows and not skip_bad_rows:
        shown = "\n  ".join(rows.bad_rows[:10])
        more = f"\n  ... and {len(rows.bad_rows) - 10} more" if len(rows.bad_rows) > 10 else ""
        raise DataError(
            f"{len(rows.bad_rows)} bad row(s) in {rows.source} "
            f"(pass --skip-bad-rows, or skip_bad_rows=True in Python, to drop and count them):\n  {shown}{more}"
        )
    if not rows.examples:
        raise DataError(f"{rows.source}: no valid rows ({len(rows.bad_rows)} bad row(s))")
    return rows


def parse_phrasebank_text(
    text: str, source: str, labels: tuple[str, ...] = DEFAULT_LABELS, skip_bad_rows: bool = False, path: str = ""
) -> Rows:
    """Parse the `sentence@label` lines of one Sentences_*Agree.txt (already decoded)."""
    rows = Rows(source=source, path=path or source)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (the file ends with CRLF) are not rows
        where = f"{source}:{lineno}"
        if "@" not in line:
            rows.bad_rows.append(f"{where}: no '@' separating sentence and label in {line[:60]!r}")
            continue
        sentence, raw_label = line.rsplit("@", 1)  # the LAST '@': sentences may contain one
        sentence = sentence.strip()
        if not sentence:
            rows.bad_rows.append(f"{where}: empty sentence before '@'")
            continue
        label, reason = _parse_label(raw_label, labels)
        if reason:
            rows.bad_rows.append(f"{where}: {reason}")
            continue
        rows.examples.append(Example(sentence, label))
        rows.origins.append(where)
        rows.splits.append(None)
    return _finish(rows, skip_bad_rows)


def _phrasebank_member(agreement: str) -> str:
    return f"Sentences_{AGREEMENTS[agreement]}.txt"


def read_phrasebank(
    source: str | Path,
    agreement: str | int | None = None,
    labels: tuple[str, ...] = DEFAULT_LABELS,
    skip_bad_rows: bool = False,
) -> Rows:
    """Read FinancialPhraseBank from the official zip, its unzipped folder, or one Sentences file.

    `agreement` (50 | 66 | 75 | all, default 50) picks the member of a zip / folder; for a single
    Sentences_*Agree.txt the file decides, and an explicit agreement that disagrees is an error.
    Files are latin-1 with CRLF line ends.
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        found = re.search(r"Sentences_(\w+)Agree\.txt$", path.name)
        if agreement is not None and found and _normalise_agreement(found.group(1)) != _normalise_agreement(agreement):
            raise DataError(f"{path}: file is agreement {found.group(1)}, but agreement={agreement!r} was asked "
                            f"(pass --agreement {found.group(1).lower()})")
        return parse_phrasebank_text(path.read_bytes().decode("latin-1"), str(path), labels, skip_bad_rows, str(path))
    member = _phrasebank_member(_normalise_agreement(agreement if agreement is not None else "50"))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = f"{ZIP_DIR}/{member}"
            if name not in archive.namelist():
                raise DataError(f"{path}: member {name!r} not found; has {archive.namelist()}")
            text = archive.read(name).decode("latin-1")
        return parse_phrasebank_text(text, f"{path}:{name}", labels, skip_bad_rows, str(path))
    if path.is_dir():
        for candidate in (path / member, path / ZIP_DIR / member, path / ZIP_NAME):
            if candidate.is_file():
                return read_phrasebank(candidate, agreement, labels, skip_bad_rows)
        raise DataError(f"{path}: folder has neither {member} nor {ZIP_DIR}/{member} nor {ZIP_NAME}")
    raise DataError(f"{path}: not found, or not a FinancialPhraseBank zip / folder / Sentences_*Agree.txt")


def _table_record(
    record: dict, where: str, labels: tuple[str, ...], rows: Rows, has_split: bool
) -> None:
    """Validate one CSV / JSONL record and append it to `rows` (or to its bad rows)."""
    text, raw_label = record.get("text"), record.get("label")
    if not isinstance(text, str) or not text.strip():
        rows.bad_rows.append(f"{where}: field 'text' is empty or missing (found {text!r})")
        return
    if isinstance(raw_label, int) and not isinstance(raw_label, bool):
        raw_label = str(raw_label)  # JSON's 0 / 1 / 2, as the same labels read from a CSV
    if not isinstance(raw_label, str):
        rows.bad_rows.append(f"{where}: field 'label' is missing or not a string (found {raw_label!r})")
        return
    label, reason = _parse_label(raw_label, labels)
    if reason:
        rows.bad_rows.append(f"{where}: field 'label': {reason}")
        return
    split = None
    if has_split:
        split = str(record.get("split") or "").strip().lower()
        if split not in SPLIT_NAMES:
            found = record.get("split")
            rows.bad_rows.append(f"{where}: field 'split' is {found!r}, expected one of {list(SPLIT_NAMES)}")
            return
    rows.examples.append(Example(text.strip(), label))
    rows.origins.append(where)
    rows.splits.append(split)


def _not_utf8(path: Path) -> DataError:
    """Where the first byte that is not UTF-8 sits (the text reader only knows its chunk)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        where = f" at line {line} (byte {data[err.start:err.start + 1]!r})"
    return DataError(f"{path}: not UTF-8 text{where}; save the file as UTF-8")


def read_table(
    path: str | Path, labels: tuple[str, ...] = DEFAULT_LABELS, skip_bad_rows: bool = False
) -> Rows:
    """Read a CSV (.csv) or JSON-lines (.jsonl / .json) file with `text`, `label` and optional `split`.

    With a `split` column every row must say train, validation or test; those splits are used as given.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = Rows(source=str(path), path=str(path))
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            try:
                columns = reader.fieldnames or []
                if "text" not in columns or "label" not in columns:
                    raise DataError(f"{path}: header has columns {columns}, expected 'text' and 'label'")
                start = reader.line_num + 1
                for record in reader:  # a record may span lines (a quoted newline, or an unclosed quote)
                    span = f"{start}" if reader.line_num == start else f"{start}-{reader.line_num}"
                    _table_record(record, f"{path}:{span}", labels, rows, "split" in columns)
                    start = reader.line_num + 1
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            except csv.Error as err:  # e.g. a field over csv's size limit
                raise DataError(f"{path}:{start}: not a readable CSV record ({err})") from None
    elif path.suffix.lower() in (".jsonl", ".json"):
        try:
            # "\n" only: splitlines() would also split inside a text at U+2028 / U+2029 / U+0085, which
            # json.dumps(ensure_ascii=False) leaves unescaped
            lines = path.read_text(encoding="utf-8-sig").split("\n")
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        records = []  # (line number, object); parsed first so we know whether any row has a split
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                rows.bad_rows.append(f"{path}:{lineno}: not valid JSON ({err.msg})")
                continue
            if not isinstance(record, dict):
                rows.bad_rows.append(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
                continue
            records.append((lineno, record))
        has_split = any("split" in record for _, record in records)
        for lineno, record in records:
            _table_record(record, f"{path}:{lineno}", labels, rows, has_split)
    else:
        raise DataError(f"{path}: unknown extension {path.suffix!r}, expected .csv or .jsonl")
    return _finish(rows, skip_bad_rows)


def fetch_phrasebank_zip() -> Path:
    """Download (or reuse from the hub cache) the official zip from the Hugging Face Hub."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=HF_REPO_ID, repo_type="dataset", filename=HF_FILENAME))
    except Exception as err:  # offline, unreachable, not cached: all mean "give me a path"
        raise DataError(
            f"could not fetch {HF_REPO_ID}/{HF_FILENAME} from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err)[:200]}). Pass --data PATH: the "
            f"{ZIP_NAME}, its unzipped folder, a Sentences_*Agree.txt, or a CSV / JSONL with text,label"
        ) from err


# ---------------------------------------------------------------- dedupe and splits


def deduplicate(rows: Rows) -> tuple[Rows, int, list[str]]:
    """Drop exact (text, label) repeats and, for a text seen with two labels, keep the first.

    With a split column, repeats are looked up per (split, text) so that cross-split leaks are
    left for `check_disjoint` to report. Returns (rows, n_duplicates, conflict descriptions).
    """
    kept: dict[tuple[str | None, str], int] = {}  # (split, text) -> index into out
    out = Rows(source=rows.source, path=rows.path, bad_rows=list(rows.bad_rows))
    n_duplicates, conflicts = 0, []
    for example, origin, split in zip(rows.examples, rows.origins, rows.splits):
        first = kept.get((split, example.text))
        if first is None:
            kept[(split, example.text)] = len(out.examples)
            out.examples.append(example)
            out.origins.append(origin)
            out.splits.append(split)
        elif out.examples[first].label == example.label:
            n_duplicates += 1
        else:
            conflicts.append(
                f"{origin}: label {example.label!r} dropped, {out.origins[first]} has "
                f"{out.examples[first].label!r} for the same text"
            )
    return out, n_duplicates, conflicts


def check_disjoint(splits: dict[str, list[Example]], origins: dict[str, list[str]] | None = None) -> None:
    """Raise if any text is in two splits (a test sentence must never be trained on).

    `origins` ("file:line" of each example, per split) lets the message point at both rows.
    """
    seen: dict[str, tuple[str, str]] = {}
    for name, examples in splits.items():
        where = (origins or {}).get(name) or [""] * len(examples)
        for example, origin in zip(examples, where):
            other, other_origin = seen.setdefault(example.text, (name, origin))
            if other != name:
                rows = f" ({other_origin} and {origin})" if origin and other_origin else ""
                raise DataError(f"text is in both {other!r} and {name!r} (leak){rows}: {example.text[:80]!r}")


def _by_class(examples: list[Example], labels: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {label: np.array([i for i, e in enumerate(examples) if e.label == label], dtype=int) for label in labels}


def _largest_remainder(total: int, counts: dict[str, int]) -> dict[str, int]:
    """Split `total` across classes in proportion to `counts` (Hamilton's method, ties by order)."""
    n = sum(counts.values())
    exact = {k: total * c / n for k, c in counts.items()}
    quota = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(counts, key=lambda k: -(exact[k] - quota[k]))  # stable: ties keep label order
    for k in order[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def _take(examples: list[Example], index: list[int] | np.ndarray) -> list[Example]:
    return [examples[i] for i in index]


def split_seed(
    examples: list[Example], labels: tuple[str, ...], train_per_class: int, test_per_class: int, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Balanced split: per class `train_per_class` train and `test_per_class` test, rest validation.

    Train is shuffled with the seed; validation and test keep source order.
    """
    rng = np.random.default_rng(seed)
    train, validation, test = [], [], []
    for label, index in _by_class(examples, labels).items():
        need = train_per_class + test_per_class
        if len(index) < need:
            raise DataError(
                f"class {label!r} has {len(index)} rows after dedupe; the seed protocol needs "
                f"train_per_class + test_per_class = {train_per_class} + {test_per_class} = {need}"
            )
        perm = rng.permutation(index)
        train += perm[:train_per_class].tolist()
        test += perm[train_per_class:need].tolist()
        validation += perm[need:].tolist()
    train = rng.permutation(train).tolist()
    return _take(examples, train), _take(examples, sorted(validation)), _take(examples, sorted(test))


def _stratified_pick(
    index_by_class: dict[str, np.ndarray], total: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Pick `total` indices stratified by class; return (picked, rest), each sorted."""
    quota = _largest_remainder(total, {k: len(v) for k, v in index_by_class.items()})
    picked, rest = [], []
    for label, index in index_by_class.items():
        if quota[label] > len(index) or (len(index) and quota[label] == len(index)):
            raise DataError(f"class {label!r} has {len(index)} rows, too few for a stratified pick of {quota[label]}")
        perm = rng.permutation(index)
        picked += perm[: quota[label]].tolist()
        rest += perm[quota[label]:].tolist()
    return sorted(picked), sorted(rest)


def split_standard(
    examples: list[Example],
    labels: tuple[str, ...],
    seed: int,
    n_test: int,
    validation_fraction: float,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Stratified split: `n_test` test rows, then ceil(validation_fraction * rest) validation.

    Train is shuffled with the seed; validation and test keep source order.
    """
    rng = np.random.default_rng(seed)
    for label, index in _by_class(examples, labels).items():
        if len(index) == 0:
            raise DataError(f"class {label!r} has no rows; cannot stratify over labels {list(labels)}")
    test, rest = _stratified_pick(_by_class(examples, labels), n_test, rng)
    pool = _take(examples, rest)
    n_validation = math.ceil(validation_fraction * len(pool))  # sklearn's rounding for a float size
    by_class = {k: np.array(rest)[v] for k, v in _by_class(pool, labels).items()}
    validation, train = _stratified_pick(by_class, n_validation, rng) if n_validation else ([], rest)
    train = rng.permutation(train).tolist()
    return _take(examples, train), _take(examples, validation), _take(examples, test)


def _given_splits(rows: Rows) -> tuple[list[Example], list[Example], list[Example]]:
    parts = {name: [e for e, s in zip(rows.examples, rows.splits) if s == name] for name in SPLIT_NAMES}
    origins = {name: [o for o, s in zip(rows.origins, rows.splits) if s == name] for name in SPLIT_NAMES}
    check_disjoint(parts, origins)  # the only path where a leak can come from the file itself: name its rows
    return parts["train"], parts["validation"], parts["test"]


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (data_info.json's; the packaged models' cache keys), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _counts(examples: list[Example], labels: tuple[str, ...]) -> dict[str, int]:
    found = Counter(e.label for e in examples)
    return {label: found.get(label, 0) for label in labels}


# ---------------------------------------------------------------- entry point


def load_dataset(
    source: str | Path | None,
    agreement: str | int | None = None,
    protocol: str = "seed",
    train_per_class: int = 300,
    test_per_class: int = 300,
    seed: int = 42,
    validation_fraction: float = 0.1,
    labels: tuple[str, ...] = DEFAULT_LABELS,
    test_fraction: float = 0.25,
    skip_bad_rows: bool = False,
) -> DatasetSplits:
    """Read, deduplicate and split a dataset; deterministic for a given seed.

    `source`: the official zip, its folder, a Sentences_*Agree.txt, a CSV / JSONL with text,label
    (and optional split), or None to fetch the zip from the Hugging Face Hub. `agreement` defaults
    to 50. `protocol`: "seed" (per-class counts) or "standard" (stratified; test size
    ceil(test_fraction * rows read) = 1,212 on 50Agree). A file with a split column is used as given.
    """
    labels = tuple(label.strip().lower() for label in labels)
    if INVALID_LABEL in labels:
        raise DataError(f"labels {list(labels)}: {INVALID_LABEL!r} is reserved for generated answers that name no "
                        "label (predictions.csv, the confusion matrix); rename that label in the data")
    if protocol not in ("seed", "standard"):
        raise DataError(f"protocol: found {protocol!r}, expected 'seed' or 'standard'")
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if protocol == "seed" and value < 1:  # a negative count would make the slices overlap: a "leak"
            raise DataError(f"{name} (--{name.replace('_', '-')}): found {value}, expected >= 1")
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation_fraction: found {validation_fraction}, expected a fraction in [0, 1)")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction: found {test_fraction}, expected a fraction in (0, 1)")
    path = fetch_phrasebank_zip() if source is None else Path(source)
    is_table = path.suffix.lower() in (".csv", ".jsonl", ".json")
    if is_table:
        rows = read_table(path, labels, skip_bad_rows)
    else:
        rows = read_phrasebank(path, agreement, labels, skip_bad_rows)
    unique, n_duplicates, conflicts = deduplicate(rows)
    if any(s is not None for s in unique.splits):
        protocol = "given"
        train, validation, test = _given_splits(unique)
    elif protocol == "seed":
        train, validation, test = split_seed(unique.examples, labels, train_per_class, test_per_class, seed)
    else:
        n_test = math.ceil(test_fraction * len(rows.examples))  # size of the published split
        train, validation, test = split_standard(unique.examples, labels, seed, n_test, validation_fraction)
    check_disjoint({"train": train, "validation": validation, "test": test})
    info = DataInfo(
        source=rows.source,
        sha256=file_sha256(rows.path),
        agreement=None if is_table else _agreement_of(rows.source),
        protocol=protocol,
        seed=seed,
        labels=labels,
        n_read=len(rows.examples),
        n_bad_rows=len(rows.bad_rows),
        bad_rows=rows.bad_rows,
        n_duplicates=n_duplicates,
        n_conflicts=len(conflicts),
        conflicts=conflicts,
        conflict_policy=CONFLICT_POLICY,
        n_unique=len(unique.examples),
        split_counts={n: _counts(s, labels) for n, s in zip(SPLIT_NAMES, (train, validation, test))},
    )
    return DatasetSplits(train, validation, test, info)


def _agreement_of(source: str) -> str | None:
    found = re.search(r"Sentences_(\w+)Agree\.txt", source)
    return _normalise_agreement(found.group(1)) if found else None


# ---------------------------------------------------------------- class imbalance


def class_weights(
    examples: list[Example], labels: tuple[str, ...] = DEFAULT_LABELS, mode: str = "none"
) -> dict[str, float]:
    """Per-class loss weights: "none" -> all 1.0; "balanced" -> n / (k * n_c), as sklearn does."""
    if mode == "none":
        return {label: 1.0 for label in labels}
    if mode != "balanced":
        raise DataError(f"class weight mode: found {mode!r}, expected 'none' or 'balanced'")
    counts = _counts(examples, labels)
    missing = [label for label, c in counts.items() if c == 0]
    if missing:
        raise DataError(f"balanced class weights: no examples of {missing} among {len(examples)}")
    n, k = len(examples), len(labels)
    return {label: n / (k * c) for label, c in counts.items()}


def balanced_order(examples: list[Example], seed: int, epoch: int) -> list[int]:
    """Indices for one epoch with every class oversampled to the majority count, shuffled.

    A minority class is repeated whole as often as fits, and the remainder is sampled without
    replacement, so every example appears floor or ceil(majority / n_c) times. Seeded by (seed, epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    by_label: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(i)
    if not by_label:
        raise DataError("balanced_order: no examples")
    target = max(len(v) for v in by_label.values())
    order: list[int] = []
    for index in by_label.values():
        repeats, remainder = divmod(target, len(index))
        order += index * repeats + rng.choice(index, size=remainder, replace=False).tolist()
    return rng.permutation(order).tolist()
