"""PNG plots of ``orthotune inspect --plot`` and ``orthotune finetune``, with matplotlib and without it.

Truths: the PNG signature and a non-trivial size (the figure was rendered), the files a run leaves, and the
commands' other outputs unchanged when matplotlib is missing (simulated by making its import fail).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from references import run_cli
from test_cli import jsonl_file, tiny_model  # noqa: F401  (fixtures)
from test_cli_merge_inspect import _make_adapter, base_dir  # noqa: F401  (fixture)

import orthotune
from orthotune.cli.plots import INSTALL_HINT, LOSS_PLOT, PREDICTIONS_PLOT, save_finetune_plots

pytest.importorskip("matplotlib")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, path  # axes, bars and labels, not an empty canvas


@pytest.fixture
def without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import matplotlib`` (and its submodules) raise ImportError, as when it is not installed."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)


def _adapter(base: Path, tmp_path: Path) -> Path:
    config = orthotune.OFTConfig(
        oft_block_size=8, target_modules=["query", "value"], task_type="SEQ_CLS", use_cayley_neumann=False
    )
    _make_adapter(base, tmp_path / "adapter", config)
    return tmp_path / "adapter"


def test_inspect_plot_with_and_without_base(base_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    adapter = _adapter(base_dir, tmp_path)
    plot = tmp_path / "layers.png"
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--plot", str(plot))
    assert status == 0, err
    assert_png(plot)
    assert f"plot:      {plot}" in out and "adapter:" in out  # the table is still printed
    with_energy = tmp_path / "energy.png"
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--base", str(base_dir), "--plot", str(with_energy))
    assert status == 0, err
    assert_png(with_energy)
    assert with_energy.stat().st_size > plot.stat().st_size  # a fourth panel: the energy change
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--json", "--plot", str(tmp_path / "j.png"))
    assert status == 0 and json.loads(out)["peft_type"] == "OFT"  # stdout stays pure JSON
    assert "plot:" in err
    status, _, err = run_cli(capsys, "inspect", str(adapter), "--plot", str(tmp_path / "missing" / "x.png"))
    assert status != 0 and "--plot" in err and len(err.strip().splitlines()) == 1


def test_inspect_without_matplotlib_says_how_to_install_it(
    base_dir: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
    without_matplotlib: None,
) -> None:
    adapter = _adapter(base_dir, tmp_path)
    plot = tmp_path / "layers.png"
    status, out, err = run_cli(capsys, "inspect", str(adapter), "--plot", str(plot))
    assert status == 0, err
    assert INSTALL_HINT in out and "pip install" in INSTALL_HINT and "adapter:" in out
    assert not plot.exists()


def test_save_finetune_plots(tmp_path: Path) -> None:
    losses = [1.0 / (step + 1) for step in range(60)]
    message = save_finetune_plots(tmp_path, losses, "regression", [0.1, 0.5, 0.9], [0.0, 0.5, 1.0])
    assert LOSS_PLOT in message and PREDICTIONS_PLOT in message
    assert_png(tmp_path / LOSS_PLOT)
    assert_png(tmp_path / PREDICTIONS_PLOT)
    classification = tmp_path / "classification"
    classification.mkdir()
    save_finetune_plots(classification, losses, "classification")
    assert sorted(path.name for path in classification.iterdir()) == [LOSS_PLOT]


def _finetune(capsys, tiny_model: Path, jsonl_file: Path, output: Path) -> tuple[int, str, str]:  # noqa: F811
    return run_cli(
        capsys,
        "finetune",
        "--model",
        str(tiny_model),
        "--data",
        str(jsonl_file),
        "--label-column",
        "rating",
        "--target-modules",
        "query,value",
        "--block-size",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--output",
        str(output),
        "--quiet",
    )


def test_finetune_saves_loss_and_prediction_plots_beside_metrics(
    capsys,
    tmp_path: Path,
    tiny_model: Path,  # noqa: F811
    jsonl_file: Path,  # noqa: F811
) -> None:
    output = tmp_path / "run"
    status, out, err = _finetune(capsys, tiny_model, jsonl_file, output)
    assert status == 0, err
    assert (output / "metrics.json").is_file()
    assert_png(output / LOSS_PLOT)
    assert_png(output / PREDICTIONS_PLOT)  # a regression task
    assert f"plots:     {LOSS_PLOT}, {PREDICTIONS_PLOT}" in out


def test_finetune_without_matplotlib_still_saves_the_adapter(
    capsys,
    tmp_path: Path,
    tiny_model: Path,  # noqa: F811
    jsonl_file: Path,  # noqa: F811
    without_matplotlib: None,
) -> None:
    output = tmp_path / "run"
    status, out, err = _finetune(capsys, tiny_model, jsonl_file, output)
    assert status == 0, err
    assert INSTALL_HINT in out
    files = {path.name for path in output.iterdir()}
    assert {"adapter_model.safetensors", "metrics.json"} <= files
    assert not files & {LOSS_PLOT, PREDICTIONS_PLOT}
