"""``orthotune convert``: adapter files rewritten in another format (and a reason where no exact one exists)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from orthotune.cli.common import HelpFormatter, UsageError, check_output, write_output
from orthotune.cli.loading import adapter_file, base_dir, load_adapted_model

_LYCORIS_REFUSAL = (
    "LyCORIS/kohya OFT and BOFT (oft_blocks, oft_diag, boft_blocks) rotate a layer's outputs (W ↦ R W), peft's "
    "and orthotune's rotate its inputs (W ↦ W Rᵀ); no input rotation equals an output rotation in general, so "
    "there is no exact conversion in either direction; merge the adapter into the model instead"
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert adapter files between formats (explains what cannot be converted)",
        description=(
            "Convert adapter files. Supported: peft/orthotune directories of any peft version orthotune reads "
            "(including old peft 0.14-0.15 OFT files, which need --base to learn the layer widths) into the "
            "current peft 0.21.2 format. Not supported, because the math does not allow it: LyCORIS/kohya "
            "OFT/BOFT files (they rotate the layer outputs, peft rotates the inputs)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="adapter directory, or a LyCORIS .safetensors file")
    parser.add_argument("--to", choices=("peft", "lycoris"), default="peft", help="target format")
    parser.add_argument("--base", metavar="MODEL_DIR", help="base model directory (for old peft OFT files)")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="directory to write to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_convert)


def _is_lycoris(path: Path) -> bool:
    """A LyCORIS/kohya file: a .safetensors file (or a directory of one) with OFT keys and no peft config."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return False
    for candidate in files:
        try:
            from safetensors import safe_open

            with safe_open(str(candidate), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception:
            continue
        if any(key.endswith((".oft_blocks", ".oft_diag", ".boft_blocks")) or key.startswith("lora_") for key in keys):
            return True
    return False


def run_convert(args: argparse.Namespace) -> int:
    source = Path(args.source)
    output = Path(args.output)
    if not source.exists():
        raise UsageError(f"SOURCE {source} does not exist")
    if _is_lycoris(source):
        raise UsageError(f"{source} is a LyCORIS/kohya adapter: {_LYCORIS_REFUSAL}")
    if args.to == "lycoris":
        raise UsageError(f"--to lycoris: {_LYCORIS_REFUSAL}")
    file = adapter_file(args.source)
    check_output(output, args.overwrite)
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
