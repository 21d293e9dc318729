"""Writing files so that a crash or an error never leaves half of one: temporary file, fsync, rename.

Each file is written completely to a temporary file in its own directory and then moved over the old one
with ``os.replace`` (atomic on POSIX and Windows). A set of files that belong together (an adapter's config
and weights) is written completely before any of them replaces its predecessor. New files get the
permissions any new file would get (``0666`` less the umask): ``mkstemp`` and safetensors make them private,
and an adapter is meant to be shared.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["publish_permissions", "write_atomic", "write_bytes", "write_files_atomically"]


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (no atomicity by itself)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    write_files_atomically({path: lambda temporary: write_bytes(temporary, data)})


def write_files_atomically(writers: Mapping[str | os.PathLike[str], Callable[[str], object]]) -> None:
    """Write every file with its ``writer(temporary_path)``, then move them all into place.

    If any writer fails, no file is replaced and every temporary file is removed.
    """
    temporaries: dict[str, str | os.PathLike[str]] = {}
    try:
        for path, writer in writers.items():
            temporary = _temporary_path(path)
            temporaries[temporary] = path
            writer(temporary)
        for temporary, path in temporaries.items():
            _publish(temporary, path)
    except BaseException:
        for temporary in temporaries:
            _remove_quietly(temporary)
        raise


def publish_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and, for a directory, everything below it) the permissions of a new file or directory."""
    umask = _umask()
    root = Path(path)
    for item in [root, *root.rglob("*")] if root.is_dir() else [root]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    return 0o666 & ~_umask()


def _temporary_path(path: str | os.PathLike[str]) -> str:
    directory, name = os.path.split(os.fspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    os.close(handle)
    return temporary


def _publish(temporary: str, path: str | os.PathLike[str]) -> None:
    os.chmod(temporary, _new_file_mode())
    os.replace(temporary, path)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
