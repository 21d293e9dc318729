"""What every subcommand shares: one-line errors, argument types, and writing an output directory safely.

Nothing here imports torch: ``orthotune --help`` builds every subcommand's parser from this module alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from orthotune.atomic_write import publish_permissions
from orthotune.validation import check_probability

#: Exit status for input the user must fix (argparse uses the same).
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Files ``orthotune finetune`` writes beside the adapter (``merge`` recognises its adapters by the head config).
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
METRICS = "metrics.json"


class UsageError(Exception):
    """Input the user can fix; the message is printed as one line, without a traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line that points at ``--help`` (not the usage block and a second line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# ------------------------------------------------------------------------------------------------ parser
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def probability(text: str) -> float:
    value = float(text)
    try:
        check_probability("probability", value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)") from error
    return value


# argparse names the converter in "invalid <name> value"; these names read well there.
positive_int.__name__ = "positive integer"
non_negative_int.__name__ = "non-negative integer"
positive_float.__name__ = "positive number"
probability.__name__ = "probability"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose help already says what leaving them out does."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without ``--overwrite``) or cannot be written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {path} is a file; pass a directory path")
    if path.exists() and not overwrite:
        raise UsageError(f"--output {path} already exists; pass --overwrite to replace it, or choose another --output")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path}: cannot create it in {ancestor} (not writable); choose another --output")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def write_output(path: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Write into a staging directory next to ``path`` and move it into place only when complete."""
    missing = []
    ancestor = path.parent
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write(staging)
        publish_permissions(staging)
        if path.exists():
            if not overwrite:
                raise UsageError(f"--output {path} appeared while training; pass --overwrite or another --output")
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.rename(retired / path.name)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in missing:  # parents this call created, innermost first
            try:
                directory.rmdir()
            except OSError:
                break
        if isinstance(error, OSError):
            raise UsageError(f"--output {path}: writing failed ({error}); nothing was written") from error
        raise
