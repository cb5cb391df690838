"""Atomic output folders: everything is written into a hidden sibling, then renamed into place.

An interrupted run leaves either no output folder or the previous one intact, never a partial
adapter. ``--overwrite`` swaps the old folder out only after the new one is complete, in one
atomic exchange where the filesystem supports it (Linux ``renameat2(RENAME_EXCHANGE)``).

The hidden staging folder is ``.<name>.tmp-<host>-<pid>-<random>``; one left behind by a run that
was killed outright (SIGKILL, power loss) is removed by the next run into the same folder once
its process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from crosslora.errors import CrossLoraError


def _parent(out: Path) -> Path:
    return out.parent if str(out.parent) else Path(".")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_filesystem(out: Path) -> Path:
    """The nearest existing folder at or above ``out``'s parent: where temporary files that need
    the output's disk (not a tmpfs in memory) go."""
    return _nearest_existing(_parent(out))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{_host()}-{os.getpid()}-"


def check_output_path(out: Path, overwrite: bool) -> None:
    """Fail early (before any work, writing nothing) if ``out`` cannot be written as asked."""
    remove_stale_staging(out)
    if out.exists() and not out.is_dir():
        raise CrossLoraError(f"output path {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CrossLoraError(f"output folder {out} is not empty (pass --overwrite to replace it)")
    parent = _parent(out)
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise CrossLoraError(f"output path {out}: {base} is a file, not a folder")
    # A real probe, not os.access: root ignores permission bits but not a read-only mount.
    try:
        probe = tempfile.mkdtemp(prefix=_staging_prefix(out) if base == parent else ".crosslora-",
                                 dir=base)  # fmt: skip
        os.rmdir(probe)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            raise CrossLoraError(f"no permission to write in {base}") from err
        raise CrossLoraError(f"cannot write in {base}: {err.strerror or err}") from err


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out``, else it vanishes.

    Parent folders that had to be created are removed again if the write fails.
    """
    check_output_path(out, overwrite)
    parent = _parent(out)
    created: list[Path] = []
    tmp: Path | None = None
    try:
        for folder in reversed([parent, *parent.parents]):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=parent))
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, out)
        _fsync_dir(parent)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            where = out if tmp is not None else parent
            raise CrossLoraError(f"cannot write {where}: {exc.strerror or exc}") from exc
        raise


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders for ``out`` left by runs on this host whose process is gone.

    A previous output that such a run had already moved aside is put back first.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-{_host()}-(\d+)-")
    removed = []
    parent = _parent(out)
    with contextlib.suppress(OSError):
        for entry in sorted(parent.iterdir()):
            m = pattern.match(entry.name)
            if not (m and entry.is_dir()) or _alive(int(m[1])):
                continue
            previous = entry / "previous"  # killed between the two renames of ``_replace``
            if ".old-" in entry.name and previous.is_dir() and not out.exists():
                os.rename(previous, out)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):  # atomic: ``out`` is the new folder, ``tmp`` now holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_host()}-{os.getpid()}-",
                                dir=out.parent))  # fmt: skip
    os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "previous", out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]  # fmt: skip
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # old kernel or a filesystem without RENAME_EXCHANGE: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the data is synced
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
