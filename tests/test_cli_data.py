"""Reading labelled text (CSV, TSV, JSON Lines), choosing the task from the labels, and the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthotune.cli.data import DataError, labelled_texts, read_table, train_test_split
from orthotune.cli.recipe import pearson


def test_csv_tsv_and_jsonl_read_the_same(tmp_path: Path) -> None:
    rows = [("good day", "1"), ("bad, sad", "0"), ('"quoted"', "1")]
    csv_path = tmp_path / "a.csv"
    csv_path.write_text(
        "\ufeffid,text,label\n"
        + "".join(f'{i},"{t.replace(chr(34), 2 * chr(34))}",{y}\n' for i, (t, y) in enumerate(rows)),
        encoding="utf-8",
    )
    tsv_path = tmp_path / "a.tsv"
    tsv_path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    jsonl_path = tmp_path / "a.jsonl"
    jsonl_path.write_text(
        "\n".join(json.dumps({"text": t, "label": int(y)}) for t, y in rows) + "\n\n", encoding="utf-8"
    )
    texts = [t for t, _ in rows]
    assert read_table(csv_path, "text", "label") == (texts, ["1", "0", "1"])  # the BOM does not hide "id"
    assert read_table(tsv_path, "text", "label") == (texts, ["1", "0", "1"])
    assert read_table(jsonl_path, "text", "label") == (texts, [1, 0, 1])


@pytest.mark.parametrize(
    ("labels", "task", "classes"),
    [
        (["pos", "neg", "pos", "neg"], "classification", ("neg", "pos")),
        ([True, False, True, False], "classification", ("false", "true")),
        (["10", "2", "2", "10", "1", "1"], "classification", ("1", "2", "10")),  # numeric classes sort as numbers
        ([1, 2.0, 1, 2], "classification", ("1", "2")),
        (["0.5", "-1", "2", "3"], "regression", ()),
        ([str(i) for i in range(50)] * 2, "regression", ()),  # integers with many values: a score, not classes
    ],
)
def test_auto_task(labels: list[object], task: str, classes: tuple[str, ...]) -> None:
    data = labelled_texts([f"t{i}" for i in range(len(labels))], labels, "auto")
    assert data.task == task and data.classes == classes
    if task == "classification":
        assert [classes[i] for i in data.labels] == [str(label).lower().removesuffix(".0") for label in labels]
    else:
        assert data.labels == tuple(float(label) for label in labels)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("labels", "task", "fragment"),
    [
        (["1.5", "x", "2", "3"], "regression", "'x', not a finite number"),
        (["1", "nan", "2", "3"], "regression", "'nan', not a finite number"),
        (["a", "b", "a", "0.5"], "classification", "'0.5', a fraction"),
        (["a", None, "a", "b"], "auto", "label None"),
        (["a", "", "a", "b"], "auto", "label ''"),
        ([{"x": 1}, "b", "a", "b"], "auto", "label {'x': 1}"),
        (["2", "2", "2", "2"], "regression", "regression needs labels that vary"),
    ],
)
def test_labels_of_the_wrong_kind(labels: list[object], task: str, fragment: str) -> None:
    with pytest.raises(DataError) as error:
        labelled_texts(["a", "b", "c", "d"], labels, task, source="x.csv")
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_split_is_reproducible_disjoint_and_complete() -> None:
    data = labelled_texts([f"t{i}" for i in range(101)], [str(i % 3) for i in range(101)], "auto")
    train, test = train_test_split(data, 0.2, seed=0)
    again_train, again_test = train_test_split(data, 0.2, seed=0)
    assert (train, test) == (again_train, again_test)
    assert len(test) == 20 and len(train) == 81
    assert sorted(train.texts + test.texts) == sorted(data.texts)
    assert train_test_split(data, 0.2, seed=1)[1].texts != test.texts
    with pytest.raises(DataError, match="--test-fraction"):
        train_test_split(data, 1.0)
    with pytest.raises(DataError, match="at least 2"):
        train_test_split(data.subset([0, 1, 2]), 0.2)


def test_pearson_matches_torch() -> None:
    x, y = torch.randn(50), torch.randn(50)
    y = y + x
    assert pearson(x, y) == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-6)
    assert pearson(x, torch.ones(50)) == 0.0
