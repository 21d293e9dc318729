"""Labelled text for fine-tuning: read a CSV or JSON Lines file, decide the task, split it reproducibly.

A table has one row per example, a text column and a label column. Labels decide the task:

* **regression** – every label is a number (``0.37``, ``-2``); the model predicts it, scored by Pearson's r;
* **classification** – labels are names or integers (``"pos"``, ``3``, ``true``); scored by accuracy.

``task="auto"`` picks regression when some label has a fractional part or the labels are integers with more
than :data:`MAX_AUTO_CLASSES` distinct values, classification otherwise. Every problem with the file is a
:class:`DataError` whose message names the file, the row or column, and what to do.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Task = Literal["regression", "classification"]

#: ``task="auto"`` treats integer labels with more distinct values than this as a regression target.
MAX_AUTO_CLASSES = 20

_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


class DataError(ValueError):
    """A data file or its labels cannot be used as given; the message says how to fix it."""


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with one label each.

    Attributes:
        texts: the inputs.
        labels: regression targets, or indices into ``classes``.
        task: ``"regression"`` or ``"classification"``.
        classes: class names in index order (classification), else ``()``.
        source: where the data came from, for messages.
    """

    texts: tuple[str, ...]
    labels: tuple[float, ...] | tuple[int, ...]
    task: Task
    classes: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(
            tuple(self.texts[i] for i in indices),
            tuple(self.labels[i] for i in indices),  # type: ignore[arg-type]
            self.task,
            self.classes,
            self.source,
        )


def read_table(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[object]]:
    """The text and label columns of a ``.csv``/``.tsv`` or JSON Lines (``.jsonl``/``.ndjson``/``.json``) file.

    Raises:
        DataError: the file is missing, unreadable, of another format, empty, or lacks a named column or value.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"--data {path} {what}; pass a CSV or JSON Lines file with a text and a label column")
    suffix = path.suffix.lower()
    try:
        if suffix in _CSV_SUFFIXES:
            rows = _read_csv(path, _CSV_SUFFIXES[suffix])
        elif suffix in _JSONL_SUFFIXES:
            rows = _read_jsonl(path)
        else:
            raise DataError(
                f"--data {path}: unknown format {suffix or '(no suffix)'!r}; use a .csv, .tsv or .jsonl file"
            )
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"--data {path} cannot be read ({error}); pass a UTF-8 CSV or JSON Lines file") from error
    if not rows:
        raise DataError(f"--data {path} has no rows; it needs a header (CSV) and one row per example")
    texts: list[str] = []
    labels: list[object] = []
    for number, row in rows:
        for column, option in ((text_column, "--text-column"), (label_column, "--label-column")):
            if column not in row:
                columns = ", ".join(map(repr, row)) or "none"
                raise DataError(
                    f"--data {path} row {number} has no column {column!r} (columns: {columns}); "
                    f"name the right one with {option}"
                )
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"--data {path} row {number}: text {text!r} in column {text_column!r} is not a non-empty string; "
                "fix the row or choose another --text-column"
            )
        texts.append(text)
        labels.append(row[label_column])
    return texts, labels


def _read_csv(path: Path, delimiter: str) -> list[tuple[int, dict[str, object]]]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        # TSV has no quoting (IANA text/tab-separated-values): a quote character is part of the text.
        quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(file, delimiter=delimiter, quoting=quoting)
        # Row numbers count the header as line 1, as a spreadsheet shows them.
        return [(number, dict(row)) for number, row in enumerate(reader, start=2)]


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, object]]]:
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"--data {path} line {number} is not JSON ({error.msg}); write one JSON object per line"
                ) from error
            if not isinstance(row, dict):
                raise DataError(
                    f"--data {path} line {number} is a JSON {type(row).__name__}, not an object; "
                    'write one object per line, e.g. {"text": "great", "label": 1}'
                )
            rows.append((number, row))
    return rows


def _as_number(label: object) -> float | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, (int, float)):
        return float(label)
    if isinstance(label, str):
        try:
            return float(label)
        except ValueError:
            return None
    return None


def _class_name(label: object) -> str:
    if isinstance(label, bool):
        return str(label).lower()
    number = _as_number(label)
    if number is not None and number.is_integer():
        return str(int(number))
    return str(label).strip()


def labelled_texts(
    texts: Sequence[str], raw_labels: Sequence[object], task: str = "auto", source: str = ""
) -> LabelledTexts:
    """Turn raw labels into a regression or classification target.

    Args:
        texts: one text per example.
        raw_labels: as read from the file: strings (CSV), or JSON numbers, strings and booleans.
        task: ``"auto"``, ``"regression"`` or ``"classification"``.
        source: the file, for messages.

    Raises:
        DataError: a label is missing or of the wrong kind for ``task``, or the labels cannot be learned
            (one class, a constant target, every label different).
    """
    if task not in ("auto", "regression", "classification"):
        raise DataError(f"--task {task!r} is not a task; use auto, regression or classification")
    where = f"--data {source}" if source else "the data"
    for index, label in enumerate(raw_labels):
        if label is None or isinstance(label, (list, dict)) or (isinstance(label, str) and not label.strip()):
            raise DataError(
                f"{where}: example {index + 1} has label {label!r}; every label must be a number or a class name"
            )
    numbers = [_as_number(label) for label in raw_labels]
    all_numeric = all(number is not None for number in numbers)
    if task == "auto":
        integral = all_numeric and all(number.is_integer() for number in numbers)  # type: ignore[union-attr]
        many = len({_class_name(label) for label in raw_labels}) > MAX_AUTO_CLASSES
        task = "regression" if all_numeric and (not integral or many) else "classification"

    if task == "regression":
        for index, (label, number) in enumerate(zip(raw_labels, numbers, strict=True)):
            if number is None or not math.isfinite(number):
                raise DataError(
                    f"{where}: example {index + 1} has label {label!r}, not a finite number; regression needs "
                    "numeric labels (use --task classification for class names)"
                )
        targets = tuple(float(number) for number in numbers)  # type: ignore[arg-type]
        if len(set(targets)) < 2:
            raise DataError(f"{where}: every label is {targets[0]!r}; regression needs labels that vary")
        return LabelledTexts(tuple(texts), targets, "regression", (), source)

    for index, (label, number) in enumerate(zip(raw_labels, numbers, strict=True)):
        if number is not None and not number.is_integer():
            raise DataError(
                f"{where}: example {index + 1} has label {label!r}, a fraction, not a class; "
                "use --task regression for numeric targets"
            )
    names = [_class_name(label) for label in raw_labels]
    classes = tuple(sorted(set(names), key=lambda name: (_as_number(name) is None, _as_number(name) or 0.0, name)))
    if len(classes) < 2:
        raise DataError(f"{where}: every label is {classes[0]!r}; classification needs at least two classes")
    if len(classes) > len(names) // 2:
        raise DataError(
            f"{where}: {len(classes)} different labels in {len(names)} examples is too many classes to learn; "
            "check --label-column, or use --task regression for numeric targets"
        )
    index_of = {name: index for index, name in enumerate(classes)}
    return LabelledTexts(tuple(texts), tuple(index_of[name] for name in names), "classification", classes, source)


def train_test_split(
    data: LabelledTexts, test_fraction: float = 0.2, seed: int = 0
) -> tuple[LabelledTexts, LabelledTexts]:
    """A reproducible random split: the same ``seed`` gives the same split on every machine and Python.

    Raises:
        DataError: ``test_fraction`` outside ``(0, 1)``, or too few examples for both parts.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction {test_fraction} must be between 0 and 1, e.g. 0.2")
    num_test = round(len(data) * test_fraction)
    if num_test < 2 or len(data) - num_test < 2:
        raise DataError(
            f"{len(data)} examples with --test-fraction {test_fraction} leave {num_test} to test and "
            f"{len(data) - num_test} to train; both need at least 2: add examples or change --test-fraction"
        )
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return data.subset(sorted(order[num_test:])), data.subset(sorted(order[:num_test]))
