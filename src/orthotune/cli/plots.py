"""PNG figures for the command line: ``orthotune inspect --plot`` and the plots ``orthotune finetune`` saves.

matplotlib is optional (``pip install 'orthotune[plot]'``). Without it every function here returns a line
that says how to install it and writes nothing; the command still does the rest of its work. Figures are
drawn on a :class:`matplotlib.figure.Figure` with no pyplot, so no backend or global state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What the user sees when matplotlib is missing.
INSTALL_HINT = "matplotlib is not installed; pip install 'orthotune[plot]' (or pip install matplotlib) for plots"
#: File names ``orthotune finetune`` writes beside metrics.json.
LOSS_PLOT = "loss.png"
PREDICTIONS_PLOT = "predictions.png"


def _figure_class() -> Any | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def _short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the prefix they all share (``model.layers.``), so tick labels stay readable."""
    if len(names) < 2:
        return list(names)
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def save_inspection_plot(report: Any, path: str | Path) -> str:
    """Per adapted layer of an :class:`~orthotune.inspection.AdapterReport`: the largest rotation angle, the
    largest generator norm ``‖Q‖_F``, the orthogonality error ``‖RᵀR − I‖₂`` (log scale) and, when the report
    has it (``--base``), the relative change of hyperspherical energy.

    Returns:
        A line for the user: where the plot went, or :data:`INSTALL_HINT`.
    """
    figure_class = _figure_class()
    if figure_class is None:
        return INSTALL_HINT
    layers = report.layers
    names = _short_names([layer.name for layer in layers])
    panels: list[tuple[str, list[float], bool]] = [
        ("rotation angle (°)", [layer.max_angle_degrees for layer in layers], False),
        ("max ‖Q‖_F", [layer.max_generator_norm for layer in layers], False),
        # A zero error (the identity) has no logarithm: draw it at 1e-16 instead.
        ("‖RᵀR − I‖₂", [max(layer.orthogonality_error, 1e-16) for layer in layers], True),
    ]
    if any(layer.energy is not None for layer in layers):
        energies = [math.nan if layer.energy is None else layer.energy["relative_change"] for layer in layers]
        panels.append(("Δ hyperspherical energy (rel.)", energies, False))
    figure = figure_class(figsize=(max(6.0, 0.25 * len(layers) + 2.0), 2.2 * len(panels) + 1.0), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    positions = list(range(len(layers)))
    for axis, (label, values, logarithmic) in zip(axes, panels, strict=True):
        axis.bar(positions, values, color="tab:blue")
        axis.set_ylabel(label)
        if logarithmic:
            axis.set_yscale("log")
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(positions, names, rotation=90, fontsize=7 if len(layers) > 24 else 9)
    axes[0].set_title(f"{report.peft_type} adapter: {len(layers)} layers")
    figure.savefig(path, dpi=100)
    return f"plot:      {path}"


def save_finetune_plots(
    directory: str | Path,
    step_losses: Sequence[float],
    task: str,
    predictions: Sequence[float] | None = None,
    truths: Sequence[float] | None = None,
) -> str:
    """Write ``loss.png`` (training loss per step, and its running mean) and, for regression,
    ``predictions.png`` (held-out predictions against the true labels, in label units) into ``directory``.

    Returns:
        A line for the user: what was written, or :data:`INSTALL_HINT`.
    """
    figure_class = _figure_class()
    if figure_class is None:
        return INSTALL_HINT
    directory = Path(directory)
    written = [LOSS_PLOT]
    figure = figure_class(figsize=(6.0, 4.0), layout="constrained")
    axis = figure.subplots()
    steps = range(1, len(step_losses) + 1)
    axis.plot(steps, step_losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="per step")
    window = max(1, len(step_losses) // 20)
    if window > 1:
        running = [
            sum(step_losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(step_losses))
        ]
        axis.plot(steps, running, color="tab:blue", label=f"mean of {window} steps")
    axis.set_xlabel("step")
    axis.set_ylabel("MSE (standardised)" if task == "regression" else "cross-entropy")
    axis.set_title("training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.savefig(directory / LOSS_PLOT, dpi=100)
    if task == "regression" and predictions is not None and truths is not None:
        figure = figure_class(figsize=(5.0, 5.0), layout="constrained")
        axis = figure.subplots()
        axis.scatter(truths, predictions, s=8, alpha=0.5, color="tab:blue")
        low, high = min(min(truths), min(predictions)), max(max(truths), max(predictions))
        axis.plot([low, high], [low, high], color="gray", linewidth=1, label="predicted = true")
        axis.set_xlabel("true label")
        axis.set_ylabel("predicted")
        axis.set_title(f"held-out split ({len(truths)} examples)")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.savefig(directory / PREDICTIONS_PLOT, dpi=100)
        written.append(PREDICTIONS_PLOT)
    return f"plots:     {', '.join(written)}"
