"""``orthotune inspect``: what an adapter does, layer by layer, from its files (and the base model with --base)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orthotune.cli.common import HelpFormatter, UsageError, first_line
from orthotune.cli.loading import adapter_file, base_dir, load_adapted_model


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect",
        help="describe an adapter: blocks, rotation angles, orthogonality, hyperspherical energy",
        description=(
            "Describe each adapted layer of an adapter directory from its files alone: method, block size and "
            "count, butterfly factors, parameters, the largest generator norm ‖Q‖_F, the largest rotation angle "
            "(largest |arg λ| of any block's eigenvalues), the orthogonality error ‖RᵀR − I‖₂ of the rotation "
            "the layer applies (Cayley-Neumann when the config says so) and a warning where that series is near "
            "divergence. HRA layers are one block of the layer's width: the angle and ‖HᵀH − I‖₂ are those of "
            "the product H of the layer's r reflections (180° by construction for an odd r or apply_GS, which "
            "give H the eigenvalue −1), and the generator column holds the largest Householder vector norm "
            "‖u_i‖ (H does not depend on it; the step size of training does). With --base, also the relative "
            "change of each layer's hyperspherical energy between the base and merged weights (about 0: the "
            "rotation acts on the inputs)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="directory with adapter_config.json and weights")
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory: adds hyperspherical energy")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=run_inspect)


def _energy_changes(adapter: Path, file: Any, base: Path) -> dict[str, dict[str, Any]]:
    """Per adapted module name: the hyperspherical energy of its base and merged weight."""
    from orthotune.base_layer import weight_matrix
    from orthotune.inspection import hyperspherical_energy_change

    wrapped = load_adapted_model(adapter, file, base)
    before = {
        name: (layer.kind, weight_matrix(layer.get_base_layer(), layer.kind).detach().clone())
        for name, layer in wrapped.adapter_layers()
    }
    model = wrapped.merge_and_unload()
    return {
        name: hyperspherical_energy_change(weight, weight_matrix(model.get_submodule(name), kind))
        for name, (kind, weight) in before.items()
    }


def run_inspect(args: argparse.Namespace) -> int:
    from orthotune.inspection import MAX_ENERGY_NEURONS, inspect_adapter

    adapter = Path(args.adapter)
    file = adapter_file(args.adapter)
    base = base_dir(args.base) if args.base else None
    try:
        report = inspect_adapter(file)
    except ValueError as error:
        raise UsageError(first_line(error)) from error
    if base is not None:
        energies = _energy_changes(adapter, file, base)
        for layer in report.layers:
            layer.energy = energies.get(layer.name)
        if any(energy["sampled"] < energy["neurons"] for energy in energies.values()):
            report.notes.append(
                f"hyperspherical energy: layers with more than {MAX_ENERGY_NEURONS} neurons use "
                f"{MAX_ENERGY_NEURONS} evenly spaced ones (the same for base and merged)"
            )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    _print_inspection(adapter, report, with_energy=base is not None)
    return 0


def _print_inspection(adapter: Path, report: Any, with_energy: bool) -> None:
    # HRA has no generator: its column is the largest Householder vector norm (see the command's help).
    generator, generator_total = ("max‖u_i‖", "max ‖u_i‖") if report.peft_type == "HRA" else ("max‖Q‖F", "max ‖Q‖_F")
    columns = ["layer", "method", "block", "blocks", "m", "params", generator, "angle°", "‖RᵀR−I‖₂", "built by"]
    if with_energy:
        columns.append("ΔHE rel")
    rows = []
    for layer in report.layers:
        cayley = layer.cayley + (" !near divergence" if layer.neumann_near_divergence else "")
        row = [
            layer.name,
            layer.method,
            str(layer.block_size),
            f"{layer.num_blocks}" + (" shared" if layer.block_share else ""),
            str(layer.butterfly_factors),
            f"{layer.parameters:,}",
            f"{layer.max_generator_norm:.3g}",
            f"{layer.max_angle_degrees:.3g}",
            f"{layer.orthogonality_error:.2g}",
            cayley,
        ]
        if with_energy:
            energy = layer.energy
            row.append("n/a" if energy is None else f"{energy['relative_change']:+.2g}")
        rows.append(row)
    widths = [
        max(len(column), *(len(row[i]) for row in rows)) if rows else len(column) for i, column in enumerate(columns)
    ]
    print(f"adapter:   {adapter} ({report.peft_type}, {len(report.layers)} adapted layers)")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)))
    total = report.as_dict()["total"]
    print(
        f"total:     {total['adapter_parameters']:,} adapter parameters"
        + (
            f" + {total['other_parameters']:,} in {total['other_tensors']} saved tensors"
            if total["other_tensors"]
            else ""
        )
        + f"; {generator_total} {total['max_generator_norm']:.3g}, max angle {total['max_angle_degrees']:.3g}°, "
        f"max ‖RᵀR−I‖₂ {total['orthogonality_error']:.2g}"
        + (
            f", max |ΔHE| {total['max_abs_relative_energy_change']:.2g} (relative)"
            if "max_abs_relative_energy_change" in total
            else ""
        )
    )
    for name in total["neumann_near_divergence"]:
        print(
            f"warning:   {name}: the Cayley-Neumann series is near divergence (‖Q‖₂ bound ≥ 0.9); "
            "prefer use_cayley_neumann=False"
        )
    for note in report.notes:
        print(f"note:      {note}")
