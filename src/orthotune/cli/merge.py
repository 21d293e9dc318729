"""``orthotune merge``: an adapter merged into its base model, saved as a plain transformers model."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from orthotune.cli.common import HelpFormatter, UsageError, first_line, write_output
from orthotune.cli.loading import adapted_model_for_output

#: Files of a tokenizer (and processor) that ``merge`` copies from the base directory when present.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge an adapter into its base model and save the plain model",
        description=(
            "Load a local transformers model, load the OFT/BOFT/HRA adapter onto it, merge the rotations into the "
            "weights and save the plain model (with the base directory's tokenizer files) to --output. The saved "
            "model gives the adapted model's outputs with no adapter code. The model class comes from the "
            "adapter's task_type, else its auto_mapping, else the base model's architecture when the adapter's "
            "layer names fit it, else AutoModel."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="directory with adapter_config.json and weights")
    parser.add_argument("--base", required=True, metavar="MODEL_DIR", help="local transformers base model directory")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="directory to write the merged model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    adapter, base, output, file, wrapped = adapted_model_for_output(args)
    layers = sum(1 for _ in wrapped.adapter_layers())
    try:
        merged = wrapped.merge_and_unload()
    except (NotImplementedError, ValueError) as error:
        raise UsageError(f"cannot merge: {first_line(error)}") from error

    def write(directory: Path) -> None:
        merged.save_pretrained(directory)
        for name in _TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, directory / name)

    write_output(output, args.overwrite, write)
    print(f"merged:    {file.config.peft_type} adapter {adapter} into {layers} layers of {type(merged).__name__}")
    print(f"saved:     {output}")
    return 0
