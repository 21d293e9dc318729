"""``orthotune inspect``: what an adapter does, layer by layer, from its files (and the base model with --base)."""

from __future__ import annotations

import argparse
import json
import sys
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
            "rotation acts on the inputs). A single .safetensors file (LyCORIS diag-oft/boft, legacy oft_diag, "
            "kohya, OneTrainer) is described from its tensors alone: its format, the side it rotates, and per "
            "layer also LyCORIS's constraint (alpha; where it binds, the angles are after it) and the output "
            "scale (rescale)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "adapter",
        metavar="ADAPTER",
        help="directory with adapter_config.json and weights, or a single-file .safetensors adapter (LyCORIS, …)",
    )
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory: adds hyperspherical energy")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the per-layer figures into this PNG file")
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
    if adapter.is_file():
        return _inspect_single_file(args, adapter)
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
    plotted = _inspection_plot(report, args.plot) if args.plot else None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_inspection(adapter, report, with_energy=base is not None)
    if plotted:
        print(plotted, file=sys.stderr if args.json else sys.stdout)
    return 0


def _inspect_single_file(args: argparse.Namespace, path: Path) -> int:
    from orthotune.inspection import inspect_layer_adapters
    from orthotune.single_file import layers_by_file_name, read_single_file

    if args.base:
        raise UsageError("--base is for adapter directories; a single file is described from its tensors alone")
    try:
        file = read_single_file(path)
        layers = {adapter.source or name: adapter for name, adapter in layers_by_file_name(file).items()}
        report = inspect_layer_adapters(layers, file.format.NAME)
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: {first_line(error)}") from error
    plotted = _inspection_plot(report, args.plot) if args.plot else None
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_inspection(path, report, with_energy=False)
    if plotted:
        print(plotted, file=sys.stderr if args.json else sys.stdout)
    return 0


def _inspection_plot(report: Any, path: str) -> str:
    from orthotune.cli.plots import save_inspection_plot

    try:
        return save_inspection_plot(report, path)
    except (OSError, ValueError) as error:  # matplotlib: a missing directory, an unknown file extension
        raise UsageError(f"--plot {path}: cannot write it ({first_line(error)})") from error


def _print_inspection(adapter: Path, report: Any, with_energy: bool) -> None:
    # HRA has no generator: its column is the largest Householder vector norm (see the command's help).
    generator, generator_total = ("max‖u_i‖", "max ‖u_i‖") if report.peft_type == "HRA" else ("max‖Q‖F", "max ‖Q‖_F")
    columns = ["layer", "method", "block", "blocks", "m", "params", generator, "angle°", "‖RᵀR−I‖₂", "built by"]
    single_file = report.format != "peft"
    if single_file:
        columns[2:2] = ["side"]
        columns += ["alpha", "rescale"]
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
        if single_file:
            row[2:2] = [layer.rotation_side]
            binds = f" (binds ×{layer.constraint_scale:.2g})" if layer.constraint_scale < 1 - 1e-12 else ""
            row.append(f"{layer.constraint:g}{binds}")
            scale = layer.output_scale_range
            row.append("-" if scale is None else f"{scale[0]:.3g}…{scale[1]:.3g}")
        if with_energy:
            energy = layer.energy
            row.append("n/a" if energy is None else f"{energy['relative_change']:+.2g}")
        rows.append(row)
    widths = [
        max(len(column), *(len(row[i]) for row in rows)) if rows else len(column) for i, column in enumerate(columns)
    ]
    sides = sorted({layer.rotation_side for layer in report.layers})
    kind = f"{report.format}: {report.peft_type}, {'/'.join(sides)} side" if single_file else report.peft_type
    print(f"adapter:   {adapter} ({kind}, {len(report.layers)} adapted layers)")
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
