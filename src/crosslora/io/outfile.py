"""Single output files (``eval --output``, ``inspect --json/--png``): checked before any work,
never an input, written whole or not at all.

``check_output_file`` refuses, in one line naming the option: a path that is a folder, a parent
folder that is missing, is a file or cannot be written, and a path that is (or links to) one of
the command's input files. ``write_atomic`` writes a temporary file beside the output and
renames it into place, so an interrupted or failed write leaves the previous file (or nothing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from crosslora.errors import CrossLoraError

# Files a model or adapter folder is read by, whether or not they exist yet.
_INPUT_NAMES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def input_files(what: str, spec: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    """(what, file) for an input: the file itself, or for a folder every file in it and the
    names a model or adapter folder is read by."""
    if spec is None:
        return []
    path = Path(os.path.expanduser(str(spec)))
    if path.is_dir():
        names = {p.name for p in path.iterdir() if p.is_file()} | set(_INPUT_NAMES)
        return [(f"{what} file", path / name) for name in sorted(names)]
    return [(what, path)] if path.exists() else []


def check_output_file(
    path: Path, option: str, inputs: Iterable[tuple[str, str | os.PathLike[str]]] = ()
) -> None:
    """Refuse an output file that cannot be written, or that would overwrite an input."""
    if path.is_dir():
        raise CrossLoraError(f"{option} {path} is a folder; name a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise CrossLoraError(f"{option} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise CrossLoraError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CrossLoraError(f"{option} {path}: no permission to write in {parent}")
    if path.is_symlink() and not path.exists():
        raise CrossLoraError(f"{option} {path} is a symbolic link to nothing")
    real = os.path.realpath(path)
    for what, file in inputs:
        if os.path.realpath(os.path.expanduser(str(file))) == real:
            raise CrossLoraError(
                f"{option} {path} is the {what} {file}; refusing to overwrite an input"
            )


def check_distinct(paths: Iterable[tuple[str, Path | None]]) -> None:
    """Two output options may not name the same file."""
    seen: dict[str, str] = {}
    for option, path in paths:
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise CrossLoraError(f"{seen[real]} and {option} both name {path}")
        seen[real] = option


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden file beside ``path``, then rename it over ``path``; the
    temporary file never outlives a failure or an interruption."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise CrossLoraError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
