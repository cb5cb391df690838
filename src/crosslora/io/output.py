"""Output folders that never harm the user's files.

Every output is claimed before any input is read, and written whole or not at all:

- **Separate from the inputs.** An output folder that is, contains or lies inside an input (an
  adapter, a model folder, the cache), compared as resolved real paths, is refused.
- **Replaced only when it is crosslora's own.** Each output holds a marker, ``MARKER``, listing
  the files crosslora wrote there with their hashes. ``overwrite`` replaces a folder only if it is
  empty, or holds exactly those files, unchanged, and nothing else.
- **One writer at a time.** A claim holds an exclusive lock (``flock``) on a file beside the
  output until the run ends; a second run to the same folder fails at once. The final move never
  replaces a folder that appeared after the claim (``renameat2(RENAME_NOREPLACE)``), and replaces
  an earlier output only while it is still the one checked (atomic ``RENAME_EXCHANGE``).
- **Nothing half-written.** Files are written into a hidden staging folder beside the output,
  ``.<name>.tmp-<host>-<pid>-<random>``, synced and moved into place at the end. Staging folders
  of runs whose process is gone (a SIGKILL, a power loss) are removed by the next claim in that
  parent folder; they are recognised by name *and* by the marker inside, so no folder of the
  user's is ever taken for one.
- Output folders get the user's umask, like any file they create.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from crosslora.errors import CrossLoraError

MARKER = ".crosslora-output.json"
_LOCK_SUFFIX = ".crosslora-lock"


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


def _staging_prefix(out: Path, kind: str = "tmp") -> str:
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- what may be written where ----------------------------------------------------------------


def real_output_path(out: Path) -> Path:
    """``out`` with every symbolic link resolved (a link to a folder is written through, so the
    link stays valid); a link that points nowhere is refused."""
    if out.is_symlink() and not out.exists():
        raise CrossLoraError(f"output path {out} is a symbolic link to nothing")
    return Path(os.path.realpath(out))


def check_separate(out: Path, inputs: Iterable[tuple[str, str | os.PathLike[str]]]) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs``, pairs of
    (what, path) such as ("adapter", "ad/"). Paths that do not exist locally (hub ids) are
    skipped here; the resolved folders are checked again once known."""
    real = real_output_path(out)
    for what, path in inputs:
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            continue
        q = Path(os.path.realpath(p))
        if real == q:
            raise CrossLoraError(f"output path {out} is the {what} {path}; choose another folder")
        if real in q.parents:
            raise CrossLoraError(
                f"output path {out} contains the {what} {path}; choose another folder"
            )
        if q in real.parents:
            raise CrossLoraError(
                f"output path {out} lies inside the {what} {path}; choose another folder"
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _why_not_ours(folder: Path) -> str | None:
    """None if ``folder`` holds exactly what crosslora wrote there (its marker's files, unchanged,
    and nothing else); else the reason, for the error message."""
    marker = folder / MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except FileNotFoundError:
        return f"it was not written by crosslora (no {MARKER})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} is not one crosslora wrote"
    present = {p.name for p in folder.iterdir()} - {MARKER}
    extra = sorted(present - set(listed))
    if extra:
        return f"it holds files crosslora did not write ({', '.join(extra[:3])})"
    missing = sorted(set(listed) - present)
    if missing:
        return f"files crosslora wrote there are gone ({', '.join(missing[:3])})"
    for name, digest in listed.items():
        path = folder / name
        if path.is_symlink() or not path.is_file() or _sha256(path) != digest:
            return f"{name} was changed after crosslora wrote it"
    return None


def check_output_path(out: Path, overwrite: bool) -> None:
    """Fail early (writing nothing) if ``out`` cannot be written as asked: a file, a non-empty
    folder without ``overwrite``, a folder that is not crosslora's own with it, or a parent where
    nothing can be written."""
    out = real_output_path(out)
    if out.exists() and not out.is_dir():
        raise CrossLoraError(f"output path {out} is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CrossLoraError(
                f"output folder {out} is not empty (pass --overwrite to replace it)"
            )
        why = _why_not_ours(out)
        if why:
            raise CrossLoraError(
                f"refusing to replace {out}: {why}; --overwrite replaces only an output "
                "crosslora wrote, unchanged, or an empty folder"
            )
    parent = _parent(out)
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise CrossLoraError(f"output path {out}: {base} is a file, not a folder")
    # A real probe, not os.access: root ignores permission bits but not a read-only mount.
    try:
        probe = tempfile.mkdtemp(prefix=".crosslora-probe-", dir=base)
        os.rmdir(probe)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            raise CrossLoraError(f"no permission to write in {base}") from err
        raise CrossLoraError(f"cannot write in {base}: {err.strerror or err}") from err


# --- claiming and writing ---------------------------------------------------------------------


class OutputClaim:
    """An output folder held by this run: locked, checked, its parents created. ``staged()``
    yields the staging folder and moves it into place when the block succeeds."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.given = out
        self.out = real_output_path(out)
        self.overwrite = overwrite
        self.parent = _parent(self.out)
        self.created: list[Path] = []
        self.lock_fd: int | None = None
        self.found: os.stat_result | None = None  # the folder replaced, as checked at the claim

    def acquire(self) -> None:
        check_output_path(self.out, self.overwrite)
        try:
            for folder in reversed([self.parent, *self.parent.parents]):
                if not folder.exists():
                    folder.mkdir()
                    self.created.append(folder)
        except OSError as err:
            self.release()
            raise CrossLoraError(f"cannot write {self.parent}: {err.strerror or err}") from err
        remove_stale(self.parent)
        try:
            self.lock_fd = _lock(self.parent / f".{self.out.name}{_LOCK_SUFFIX}", self.out)
            check_output_path(self.out, self.overwrite)  # again, now that no other run writes it
        except BaseException:
            self.release()
            raise
        self.found = os.stat(self.out) if self.out.exists() else None

    def release(self) -> None:
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.parent / f".{self.out.name}{_LOCK_SUFFIX}")
            os.close(self.lock_fd)
            self.lock_fd = None
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: nothing written there
        self.created = []

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        tmp: Path | None = None
        try:
            tmp = _make_staging(self.out, "tmp")
            yield tmp
            _seal(tmp)
            self._commit(tmp)
            self.created = []  # the output lives in them now
            _fsync_dir(self.parent)
        except BaseException as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                where = self.out if tmp is not None else self.parent
                raise CrossLoraError(f"cannot write {where}: {exc.strerror or exc}") from exc
            raise

    def _commit(self, tmp: Path) -> None:
        if self.found is None:
            if not _rename_noreplace(tmp, self.out):
                raise CrossLoraError(
                    f"output folder {self.out} appeared while this run was working; it was left "
                    "as it is and nothing was written"
                )
            return
        now = os.stat(self.out) if self.out.exists() else None
        if now is None or (now.st_dev, now.st_ino) != (self.found.st_dev, self.found.st_ino):
            raise CrossLoraError(
                f"output folder {self.out} was replaced while this run was working; it was left "
                "as it is and nothing was written"
            )
        check_output_path(self.out, self.overwrite)  # still empty, or still crosslora's own
        _replace(tmp, self.out)


@contextlib.contextmanager
def claim_outputs(outs: list[Path], overwrite: bool) -> Iterator[list[OutputClaim]]:
    """Claim every output folder of a run (all or none), held until the block ends."""
    claims: list[OutputClaim] = []
    try:
        for out in outs:
            claim = OutputClaim(out, overwrite)
            claim.acquire()
            claims.append(claim)
        yield claims
    finally:
        for claim in reversed(claims):
            claim.release()


BENCH_MARKER = ".crosslora-bench.json"


@contextlib.contextmanager
def claim_bench_folder(
    out: Path, inputs: Iterable[tuple[str, str | os.PathLike[str]]]
) -> Iterator[Path]:
    """A benchmark's folder, held by this run: new, empty, or one a benchmark wrote (marked
    ``BENCH_MARKER``), which is resumed. Refused if it overlaps an input or another run holds it.
    Yields the real path."""
    check_separate(out, inputs)
    real = real_output_path(out)
    if real.exists() and not real.is_dir():
        raise CrossLoraError(f"--out {out} is a file")
    if real.is_dir() and any(real.iterdir()) and not (real / BENCH_MARKER).is_file():
        raise CrossLoraError(
            f"--out {out} is not empty and is not a crosslora bench folder (no {BENCH_MARKER}); "
            "choose a new folder"
        )
    try:
        real.mkdir(parents=True, exist_ok=True)
        fd = _lock(real / f".crosslora-bench{_LOCK_SUFFIX}", real)
    except OSError as err:
        raise CrossLoraError(f"cannot write {out}: {err.strerror or err}") from err
    try:
        (real / BENCH_MARKER).write_text(json.dumps({"crosslora": "bench"}) + "\n")
        yield real
    finally:
        with contextlib.suppress(OSError):
            os.unlink(real / f".crosslora-bench{_LOCK_SUFFIX}")
        os.close(fd)


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Claim ``out``, yield its staging folder, and move it into place when the block succeeds."""
    with claim_outputs([out], overwrite) as (claim,), claim.staged() as tmp:
        yield tmp


def _lock(path: Path, out: Path) -> int:
    """An exclusive lock on ``path`` (created if missing), or one error if another run holds it.
    The lock file is removed at release; a lock taken on a file that was meanwhile removed and
    created anew is taken again on the new one."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CrossLoraError(
                    f"another crosslora run is writing {out}; wait for it to finish or choose "
                    "another output folder"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise CrossLoraError(f"cannot lock {path}: it keeps being replaced")


def _make_staging(out: Path, kind: str) -> Path:
    """A hidden folder beside ``out`` holding an incomplete marker (so that a later run knows it
    for a staging folder), with the permissions the umask gives a new folder."""
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, kind), dir=_parent(out)))
    os.chmod(tmp, 0o777 & ~_umask())
    (tmp / MARKER).write_text(json.dumps({"crosslora": "staging", "pid": os.getpid()}) + "\n")
    return tmp


def _seal(folder: Path) -> None:
    """Write the marker listing every file with its hash, then sync the folder to disk."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == MARKER:
            continue
        if path.is_symlink() or not path.is_file():
            raise RuntimeError(f"{path} in a staging folder is not a plain file")
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = _sha256(path)
    text = json.dumps({"crosslora": "output", "files": files}, indent=1) + "\n"
    (folder / MARKER).write_text(text)
    with open(folder / MARKER, "rb") as f:
        os.fsync(f.fileno())
    _fsync_dir(folder)


# --- leftovers of runs that were killed -------------------------------------------------------

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")


def remove_stale(parent: Path) -> list[Path]:
    """Remove what runs on this host whose process is gone left in ``parent``: staging folders
    (named so *and* holding a crosslora marker) and lock files nobody holds. A previous output
    that such a run had already moved aside is put back first. Returns the folders removed."""
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m and m["host"] == _host() and not _alive(int(m["pid"])) and _is_staging(entry):
            out = parent / m["name"]
            previous = entry / "previous"  # killed between the two renames of ``_replace``
            if m["kind"] == "old" and previous.is_dir() and not out.exists():
                with contextlib.suppress(OSError):
                    os.rename(previous, out)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif entry.name.startswith(".") and entry.name.endswith(_LOCK_SUFFIX):
            _remove_unheld_lock(entry)
    return removed


def remove_stale_staging(out: Path) -> list[Path]:
    """``remove_stale`` for the folder that receives ``out``."""
    return remove_stale(_parent(out))


def _is_staging(entry: Path) -> bool:
    if entry.is_symlink() or not entry.is_dir():
        return False
    try:
        kind = json.loads((entry / MARKER).read_text()).get("crosslora")
    except (OSError, ValueError, AttributeError):
        return False
    return kind in ("staging", "output")  # a sealed one was killed before its move


def _remove_unheld_lock(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
    except OSError:
        pass  # held by a live run, or already gone
    finally:
        os.close(fd)


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


# --- the final move ---------------------------------------------------------------------------


def _replace(tmp: Path, out: Path) -> None:
    """Put ``tmp`` in the place of the existing folder ``out`` and delete the old one."""
    if _renameat2(tmp, out, _RENAME_EXCHANGE):  # ``out`` is the new folder, ``tmp`` the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _make_staging(out, "old")
    os.rename(out, old / "previous")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "previous", out)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rename_noreplace(tmp: Path, out: Path) -> bool:
    """Move ``tmp`` to ``out`` unless ``out`` exists (False then), atomically where the kernel
    and filesystem allow; elsewhere a check just before the rename (under this run's lock)."""
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    if out.exists() or out.is_symlink():
        return False
    os.rename(tmp, out)
    return True


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where it is not available (old kernel, other filesystems)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]  # fmt: skip
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot fsync a directory; the data is synced
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
