"""The progress bar's fallback when tqdm is not installed: a line every tenth of the way to a log."""

from __future__ import annotations

import io
import sys

import pytest

from orthotune.cli.progress import ProgressBar


def test_text_bar_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    stream = io.StringIO()
    with ProgressBar(20, "fine-tuning", stream=stream) as bar:
        for _ in range(20):
            bar.update(1, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11  # the first step, then each tenth of the way: a log gets no line per step
    assert lines[-1].startswith("fine-tuning: 100% |") and "20/20" in lines[-1] and "loss=0.5" in lines[-1]


def test_disabled_bar_draws_nothing() -> None:
    stream = io.StringIO()
    with ProgressBar(5, "x", enabled=False, stream=stream) as bar:
        bar.update(5)
    assert stream.getvalue() == "" and bar.count == 5
