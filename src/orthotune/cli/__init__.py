"""The ``orthotune`` command line: an application built on the library, which never imports it back.

::

    orthotune finetune                      # OFT on the embedded default: all-MiniLM-L6-v2, VADER lexicon
    orthotune finetune --method boft --butterfly-factors 2 --block-size 8
    orthotune finetune --model DIR --data train.csv --text-column sentence --label-column score --merge
    orthotune merge ADAPTER_DIR --base MODEL_DIR --output MERGED_DIR
    orthotune inspect ADAPTER_DIR [--base MODEL_DIR] [--json]
    orthotune convert SOURCE --output OUT_DIR
    orthotune export-lora ADAPTER_DIR --base MODEL_DIR --output LORA_DIR (--rank K | --tolerance T)
    orthotune --version

One module per subcommand, each with ``add_parser(commands)`` and a ``run_<name>(args) -> int`` that the parser
calls. Anything the user can fix is reported on one line of standard error, with a non-zero exit status.
Building the parser imports neither torch nor transformers, so ``orthotune --help`` and ``--version`` are
instant; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orthotune import __version__
from orthotune.cli import convert, export_lora, finetune, inspect, merge
from orthotune.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, Parser, UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="orthotune",
        description="Orthogonal fine-tuning (OFT, COFT, BOFT) for PyTorch models.",
        epilog="Run 'orthotune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"orthotune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in (finetune, merge, inspect, convert, export_lora):
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthotune`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    prog = f"orthotune {args.command}"
    from orthotune.cli.data import DataError

    try:
        return int(args.run(args))
    except (UsageError, DataError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
