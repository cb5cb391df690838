"""Atomic output folders: everything is written into a hidden sibling, then renamed into place.

An interrupted run leaves either no output folder or the previous one intact, never a partial
adapter. ``--overwrite`` swaps the old folder out only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from crosslora.errors import CrossLoraError


def check_output_path(out: Path, overwrite: bool) -> None:
    """Fail early (before any work) if ``out`` cannot be written as asked."""
    if out.exists() and not out.is_dir():
        raise CrossLoraError(f"output path {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CrossLoraError(f"output folder {out} is not empty (pass --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CrossLoraError(f"cannot create {parent}: {err.strerror or err}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CrossLoraError(f"no permission to write in {parent}")


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, else it vanishes."""
    check_output_path(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise CrossLoraError(f"cannot write in {out.parent}: {err.strerror or err}") from err
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CrossLoraError(f"cannot write {out}: {err.strerror or err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "previous", out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
