"""``orthotune export-lora``: write an OFT/BOFT adapter as a peft LoRA adapter (see :mod:`orthotune.lora_export`).

::

    orthotune export-lora ADAPTER_DIR --base MODEL_DIR --output LORA_DIR --rank 16
    orthotune export-lora ADAPTER_DIR --base MODEL_DIR --output LORA_DIR --tolerance 0.01
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orthotune.cli.common import HelpFormatter, UsageError, first_line, positive_int, write_output
from orthotune.cli.loading import adapted_model_for_output


def _relative_error(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a relative error in [0, 1)")
    return value


_relative_error.__name__ = "relative error"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "export-lora",
        help="write an OFT/BOFT adapter as a peft LoRA adapter, for tools that read only LoRA",
        description=(
            "Load the adapter onto the base model, take each adapted layer's weight change ΔW = W' − W (W' the "
            "merged weight) and write its truncated SVD as a peft LoRA adapter (lora_alpha = r, so peft's "
            "merged weight is W + B A). --rank K writes every layer at rank K (capped at the layer's full rank); "
            "--tolerance T writes each layer at the smallest rank with ‖W' − (W + B A)‖_F ≤ T·‖W'‖_F. The output "
            "holds adapter_config.json, adapter_model.safetensors and export_report.json (rank and relative "
            "error per layer). Below full rank the LoRA approximates the orthogonal adapter; it is no rotation."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="directory with adapter_config.json and weights")
    parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="local transformers base model directory")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="directory to write the LoRA adapter to")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, metavar="K", help="the LoRA rank of every layer")
    size.add_argument(
        "--tolerance",
        type=_relative_error,
        metavar="T",
        help="largest relative weight error per layer, e.g. 0.01; each layer gets the smallest rank within it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_export_lora)


def run_export_lora(args: argparse.Namespace) -> int:
    from orthotune.lora_export import export_lora

    adapter, _, output, _, wrapped = adapted_model_for_output(args)
    reports = []

    def write(directory: Path) -> None:
        try:
            reports.append(export_lora(wrapped, directory, rank=args.rank, tolerance=args.tolerance))
        except ValueError as error:
            raise UsageError(f"cannot export: {first_line(error)}") from error

    write_output(output, args.overwrite, write)
    report = reports[0]
    _print_report(adapter, report)
    print(f"saved:     {output} (peft LoRA adapter; load with peft.PeftModel.from_pretrained(base, '{output}'))")
    return 0


def _print_report(adapter: Path, report: Any) -> None:
    rows = [
        (
            layer.name,
            str(layer.rank),
            str(layer.full_rank),
            f"{layer.relative_error:.3g}",
            f"{layer.relative_change:.3g}",
        )
        for layer in report.layers
    ]
    columns = ("layer", "rank", "full", "rel error", "rel change")
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    how = f"rank {report.rank}" if report.rank is not None else f"tolerance {report.tolerance:g}"
    print(f"adapter:   {adapter} ({report.source_peft_type}, {len(report.layers)} layers) as LoRA at {how}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)))
    print(
        f"total:     {report.lora_parameters:,} LoRA parameters, {report.file_bytes:,} bytes; largest relative "
        f"error {report.max_relative_error:.3g} (‖W' − (W + B A)‖_F / ‖W'‖_F)"
    )
    for note in report.notes:
        print(f"note:      {note}")
