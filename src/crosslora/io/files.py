"""Opening input files without surprises: only regular files are read.

A FIFO blocks the reader until something writes to it (a run that never ends), and a device such
as ``/dev/zero`` (directly or through a symlink) never ends either, or fills memory. Every file
crosslora reads from a model or an adapter folder is checked first: its type (after symlinks) must
be a regular file. The check is made before opening (opening some devices has effects) and again
on the open descriptor (the path may have changed in between), which is opened non-blocking so
that even a FIFO swapped in at the last moment cannot block.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(mode: int) -> str | None:
    """What a non-regular, non-folder file is ("a FIFO", ...); None for files and folders."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class NotARegularFile(OSError):
    """``path`` is a FIFO, a device or a socket: it is refused unread."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", str(path))
        self.kind = kind

    def __str__(self) -> str:
        return str(self.strerror)


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (or a folder, which then fails
    as ``open`` does); raise ``NotARegularFile`` for a FIFO, device or socket, other
    ``OSError``s as ``open`` does."""
    mode = os.stat(path).st_mode
    kind = special_kind(mode)
    if kind:
        raise NotARegularFile(path, kind)
    if stat.S_ISDIR(mode):
        return open(path, "rb")  # raises IsADirectoryError, as open always did
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        kind = special_kind(os.fstat(fd).st_mode)
        if kind:
            raise NotARegularFile(path, kind)
        if getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
