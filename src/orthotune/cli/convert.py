"""``orthotune convert``: adapter files rewritten in another format, exactly, or refused with the reason.

Which conversions exist is a question of sides: peft's (and orthotune's) OFT/BOFT rotate the features a layer
reads (``W ↦ W Rᵀ``), LyCORIS's rotate what it writes (``W ↦ Rᵀ W``). Between formats of the same side the
tensors map exactly; across sides no rotation of one side equals one of the other in general, so there is no
conversion, only merging the adapter into its model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orthotune.cli.common import HelpFormatter, UsageError, check_output, first_line, write_output
from orthotune.cli.loading import adapter_file, base_dir, load_adapted_model, load_base_model

#: Why an adapter cannot change sides; ``{source}``/``{target}`` name the two sides.
_ACROSS_SIDES = (
    "{what} rotates a layer's {source}s but {target_format} files rotate its {target}s (peft: the features a layer "
    "reads, W ↦ W Rᵀ; LyCORIS: what it writes, W ↦ Rᵀ W); no rotation of one side equals one of the other in "
    "general, so there is no exact conversion: merge the adapter into its model instead (orthotune merge)"
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert adapter files between formats (explains what cannot be converted)",
        description=(
            "Convert adapter files, exactly, between formats that rotate the same side of a layer. peft/orthotune "
            "directories (any peft version orthotune reads; old peft 0.14-0.15 OFT files need --base for the "
            "layer widths) become current peft 0.21.2 directories (--to peft). Single .safetensors files "
            "(LyCORIS diag-oft/boft, legacy oft_diag, and any other readable output-side format) become LyCORIS "
            "files (--to lycoris, --output FILE). Input-side single files become peft directories (--to peft, "
            "with --base for the module names). A conversion across sides (peft's input-side rotations to "
            "LyCORIS's output-side ones, or back) is refused with the reason: no exact one exists."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="adapter directory, or a single-file .safetensors adapter")
    parser.add_argument(
        "--to", default="peft", metavar="FORMAT", help="target format: peft (a directory), or lycoris (a file)"
    )
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory, where a conversion needs the model")
    parser.add_argument("--output", required=True, metavar="OUT", help="directory (peft) or file (lycoris) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from orthotune.formats import writable_formats

    source, output = Path(args.source), Path(args.output)
    if not source.exists():
        raise UsageError(f"SOURCE {source} does not exist")
    targets = ["peft", *writable_formats()]
    if args.to not in targets:
        raise UsageError(f"--to {args.to}: not one of {targets}")
    if source.is_file():
        return _convert_file(args, source, output)
    if args.to != "peft":
        return _directory_to_file(args, source, output)
    return _directory_to_peft(args, source, output)


# ----------------------------------------------------------------------------------- peft directories
def _directory_to_peft(args: argparse.Namespace, source: Path, output: Path) -> int:
    file = adapter_file(args.source)
    check_output(output, args.overwrite)
    if getattr(file.config, "rotation_side", "input") == "output":
        raise UsageError(
            f"{source} holds an output-side adapter (rotation_side='output'), which peft's files cannot express; "
            f"convert it with --to lycoris --base MODEL_DIR"
        )
    if file.legacy_oft is None:
        from orthotune.checkpoint import save_adapter_files

        def write(directory: Path) -> None:
            save_adapter_files(directory, file.config, file.tensors)

        write_output(output, args.overwrite, write)
    else:
        if not args.base:
            raise UsageError(
                f"{source} is an old peft (0.14-0.15) OFT file; its conversion needs the layer widths: pass --base"
            )
        wrapped = load_adapted_model(source, file, base_dir(args.base))
        write_output(output, args.overwrite, wrapped.save_pretrained)
    print(f"saved:     {output} ({file.config.peft_type}, peft 0.21.2 format)")
    return 0


def _directory_to_file(args: argparse.Namespace, source: Path, output: Path) -> int:
    """A peft-format directory of an output-side adapter (written by orthotune before it refused to) as a file."""
    file = adapter_file(args.source)
    side = getattr(file.config, "rotation_side", "input")
    if side != "output":
        what = f"{source} (a {file.config.peft_type} adapter in peft's format)"
        raise UsageError(_ACROSS_SIDES.format(what=what, source=side, target="output", target_format=args.to))
    if not args.base:
        raise UsageError(f"{source}: its layers' kinds (for the file's shapes) come from the model: pass --base")
    _check_output_file(output, args.overwrite)
    wrapped = load_adapted_model(source, file, base_dir(args.base))
    _write_file(output, lambda path: wrapped.save_file(path, format=args.to))
    print(f"saved:     {output} ({args.to}, from {file.config.peft_type})")
    return 0


# -------------------------------------------------------------------------------------- single files
def _convert_file(args: argparse.Namespace, source: Path, output: Path) -> int:
    from orthotune.formats import format_named
    from orthotune.single_file import layers_by_file_name, read_single_file

    try:
        file = read_single_file(source)
        adapters = layers_by_file_name(file)
    except (OSError, ValueError) as error:
        raise UsageError(f"{source}: {first_line(error)}") from error
    sides = sorted({adapter.rotation_side for adapter in adapters.values()})
    what = f"{source} ({file.format.NAME})"
    if args.to == "peft":
        if sides != ["input"]:
            raise UsageError(_ACROSS_SIDES.format(what=what, source=sides[-1], target="input", target_format="peft"))
        return _file_to_peft(args, source, output, file.format.NAME)
    target = format_named(args.to, writing=True)
    target_side = getattr(target, "ROTATION_SIDE", None)
    if target_side is not None and sides != [target_side]:
        other = next(side for side in sides if side != target_side)
        raise UsageError(_ACROSS_SIDES.format(what=what, source=other, target=target_side, target_format=args.to))
    _check_output_file(output, args.overwrite)
    from orthotune.single_file import renamed_for_format, write_single_file

    try:
        renamed = renamed_for_format(adapters, file.format, target)
        prefixes = {name.partition(".")[0]: name.partition(".")[0] for name in renamed}
        _write_file(output, lambda path: write_single_file(path, renamed, args.to, prefixes))
    except ValueError as error:
        raise UsageError(f"{source} --to {args.to}: {first_line(error)}") from error
    print(f"saved:     {output} ({args.to}, {len(adapters)} layers, from {file.format.NAME})")
    return 0


def _file_to_peft(args: argparse.Namespace, source: Path, output: Path, format_name: str) -> int:
    """An input-side single file as a peft directory: the model gives the module paths its names flatten."""
    if not args.base:
        raise UsageError(
            f"{source}: a single file flattens module paths (. written as _); their peft names come from the "
            "model: pass --base MODEL_DIR"
        )
    check_output(output, args.overwrite)
    model = load_base_model(base_dir(args.base))
    from orthotune.model import OrthoModel

    wrapped = OrthoModel(model)
    try:
        wrapped.load_file(source)
        _check_one_config(wrapped)
    except (OSError, ValueError) as error:
        raise UsageError(f"{source} does not fit --base {args.base}: {first_line(error)}") from error
    write_output(output, args.overwrite, wrapped.save_pretrained)
    print(f"saved:     {output} ({wrapped.peft_config['default'].peft_type}, peft 0.21.2 format, from {format_name})")
    return 0


def _check_one_config(wrapped: Any) -> None:
    """peft's config gives every layer the same settings; a file whose layers differ has no peft form."""
    from orthotune.formats import layer_adapter

    config = wrapped.peft_config["default"]
    settings = {
        name: (adapter.block_size, adapter.num_factors, adapter.block_share, adapter.coft, adapter.use_cayley_neumann)
        for name, adapter in ((name, layer_adapter(layer, "default")) for name, layer in wrapped.adapter_layers())
    }
    if len(set(settings.values())) > 1:
        shown = json.dumps({name: list(value) for name, value in list(settings.items())[:4]})
        raise ValueError(
            f"the file's layers differ in (block size, factors, block_share, coft, neumann): {shown}; peft's "
            f"{config.peft_type}Config holds one setting for all layers"
        )


def _check_output_file(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory; a single-file format is written to a file path")
    if path.exists() and not overwrite:
        raise UsageError(f"--output {path} already exists; pass --overwrite to replace it, or choose another --output")
    if not path.parent.is_dir():
        raise UsageError(f"--output {path}: its directory {path.parent} does not exist")


def _write_file(path: Path, write: Any) -> None:
    """``write(path)`` writes atomically (a temporary file, then a rename): an error leaves any old file."""
    try:
        write(path)
    except OSError as error:
        raise UsageError(f"--output {path}: writing failed ({error}); nothing was written") from error
    except ValueError as error:
        raise UsageError(f"--output {path}: {first_line(error)}; nothing was written") from error
