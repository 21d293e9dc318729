"""Smoke test of the benchmark scripts behind BENCHMARKS.md: they run end to end and produce sane tables.

Each script runs in ``--quick`` mode in a subprocess, as a user would run it; nothing here asserts a
timing (the machine is shared and noisy), only that every expected row is there with positive figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_layer_step_quick(tmp_path: Path) -> None:
    out = tmp_path / "layer.json"
    stdout = run_script("layer_step.py", "--quick", "--markdown", "--json", str(out))
    assert "torch threads: 1" in stdout
    rows = json.loads(out.read_text())
    labels = {(r["impl"], r["label"]) for r in rows}
    for impl in ("orthotune", "peft"):
        for label in ("OFT b=8 exact", "OFT b=8 neumann", "COFT b=8 exact", "OFT b=8 exact block_share",
                      "BOFT b=4 m=1", "BOFT b=4 m=2", "HRA r=4"):  # fmt: skip
            assert (impl, label) in labels
            assert f"| {impl} | {label} |" in stdout
    assert ("peft", "LoRA r=4") in labels  # HRA's reference: a LoRA adapter of the same rank
    hra = next(r for r in rows if (r["impl"], r["label"]) == ("orthotune", "HRA r=4"))
    assert hra["ours_over_lora"]["median"] > 0
    assert ("frozen", "nn.Linear(64, 64)") in labels
    for r in rows:
        assert r["note"] is None, r
        for op in ("step", "infer"):
            assert r[op]["ms"]["median"] > 0 and r[op]["ratio"]["median"] > 0
            assert r[op]["ratio"]["p25"] <= r[op]["ratio"]["median"] <= r[op]["ratio"]["p75"]
        if r["impl"] == "orthotune":
            assert r["peft_over_ours"]["median"] > 0
        if r["impl"] != "frozen":
            assert r["n_params"] > 0


def test_model_step_quick(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    stdout = run_script("model_step.py", "--quick", "--only", "orthotune-oft-b32", "--json", str(out))
    results = json.loads(out.read_text())
    steps = {r["name"]: r for r in results["steps"]}
    assert set(steps) == {"orthotune-oft-b32", "peft-lora-r16"}
    assert all(r["ms"] > 0 and r["vs_lora"] > 0 and r["params"] > 0 for r in steps.values())
    memory = {r["name"]: r for r in results["memory"]}
    assert set(memory) == {"orthotune-oft-b32", "peft-lora-r16"}
    for r in memory.values():
        assert all(v > 0 for v in r["rss_mib"] + r["live_mib"])
    assert "peak RSS growth" in stdout and "orthotune-oft-b32" in stdout


def test_inference_quick(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    stdout = run_script("inference.py", "--quick", "--markdown", "--json", str(out))
    rows = {(r["group"], r["name"]): r for r in json.loads(out.read_text())}
    expected = {("batch 1", name) for name in ("merged", "orthotune-oft-b32", "peft-oft-b32", "peft-lora-r16")}
    assert expected | {("mixed batch 4", "merged"), ("mixed batch 4", "orthotune-mixed")} == set(rows)
    for (_, name), row in rows.items():
        assert row["ms"]["median"] > 0
        assert (row["vs_merged"] is None) == (name == "merged")
    assert "cpu capability" in stdout and "| batch 1 | orthotune-oft-b32 |" in stdout


def test_revisions_quick() -> None:
    stdout = run_script("revisions.py", "--quick", "--before", "HEAD")
    for impl in ("before", "after"):
        for op in ("step", "infer"):
            assert f"| OFT b=8 exact | {op} | {impl} |" in stdout
    assert "before = src at" in stdout


def test_gpu_quick_on_cpu(tmp_path: Path) -> None:
    stdout = run_script("gpu.py", "--quick", "--output", str(tmp_path))
    results = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(r["section"], r["shape"], r["variant"]): r for r in results["rows"]}
    for shape in ("64→64, n=32", "64→96, n=32"):
        for variant in ("frozen nn.Linear", "orthotune OFT b=32 exact", "orthotune OFT b=32 neumann",
                        "orthotune BOFT b=8 m=2", "peft OFT b=32 neumann", "peft BOFT b=8 m=2", "peft HRA r=8",
                        "peft LoRA r=16"):  # fmt: skip
            row = rows[("layer", shape, variant)]
            assert row["note"] == "" and row["ms"]["median"] > 0, row
            assert (row["vs_reference"] is None) == (variant == "frozen nn.Linear")
    models = {variant: row for (section, _, variant), row in rows.items() if section == "model"}
    assert {"peft-lora-r16", "orthotune-oft-b32", "orthotune-boft-b8-m2", "peft-oft-b32"} <= set(models)
    assert all(row["note"] == "" and row["ms"]["median"] > 0 and row["params"] > 0 for row in models.values())
    layer_rows = sum(row["section"] == "layer" for row in results["rows"])
    assert (tmp_path / "gpu.md").read_text().count("| layer |") == layer_rows == stdout.count("| layer |")


def test_busy_machine_child_runs_the_policy() -> None:
    stdout = run_script("busy_machine.py", "--child", "policy", "--quick", "--steps", "1")
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["mode"] == "policy" and result["threads"] >= 1 and result["seconds_per_step"] > 0
