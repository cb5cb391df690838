"""An on-disk cache of SVD bases, shared by every transfer that involves the same base model.

An entry is keyed by the identity of the weight it was computed from and by how it was
computed: the shard file (resolved path, size, mtime_ns), the tensor's name, dtype, shape and
byte span in that file's safetensors header, the role's rows (fused modules) and orientation, the
requested ranks, the SVD mode and its accuracy settings, and the device type. A changed model
file changes its size or mtime, so it misses; nothing is ever read from a stale entry.

Entries are immutable safetensors files named by the SHA-256 of their key, written to a temporary
file in the same folder and renamed into place (``os.replace``), so a reader sees a whole entry
or none, and two runs sharing the cache at once need no locks: both may compute an entry, both
write the same bytes, the last rename wins. On read an entry is verified (the header parsed and
checked, the key in its metadata compared, a SHA-256 of its tensor bytes compared); a corrupt
entry is recomputed and replaced, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from crosslora.errors import CrossLoraError
from crosslora.io.safetensors_file import TensorFile
from crosslora.paths import crosslora_home

log = logging.getLogger("crosslora")

CACHE_VERSION = 2  # 2: null-space columns from linalg.complete_basis
Bases = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U, S, V


def default_cache_dir() -> Path:
    """``$CROSSLORA_HOME/bases``, else ``~/.cache/crosslora/bases``."""
    return crosslora_home() / "bases"


def _digest_bytes(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((str(t.dtype), tuple(t.shape))).encode())
        h.update(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


@dataclass
class BasisCache:
    """``get(key, compute)``: the cached ``(U, S, V)`` for ``key``, or ``compute()`` stored."""

    root: Path
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    unwritable: int = 0
    _warned: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def stats(self) -> dict:
        return {"dir": str(self.root), "hits": self.hits, "misses": self.misses,
                "corrupt_recomputed": self.corrupt}  # fmt: skip

    def path_for(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, key: dict, compute: Callable[[], Bases]) -> Bases:
        path = self.path_for(key)
        if path.exists():
            found = self._read(path, key)
            if found is not None:
                self.hits += 1
                return found
            self.corrupt += 1
        self.misses += 1
        bases = compute()
        self._write(path, key, bases)
        return bases

    def _read(self, path: Path, key: dict) -> Bases | None:
        try:
            f = TensorFile(path)
            meta = f.metadata
            if json.loads(meta.get("key", "null")) != key or set(f.keys()) != {"u", "s", "v"}:
                raise CrossLoraError("its key does not match")
            tensors = [f.get(name) for name in ("u", "s", "v")]
            if _digest_bytes(tensors) != meta.get("sha256"):
                raise CrossLoraError("checksum mismatch")
        except (CrossLoraError, OSError, ValueError) as err:
            log.warning("warning: basis cache entry %s is corrupt (%s); recomputing", path, err)
            return None
        u, s, v = tensors
        return u, s, v

    def _write(self, path: Path, key: dict, bases: Bases) -> None:
        tensors = [t.detach().to("cpu").contiguous() for t in bases]
        meta = {"key": json.dumps(key, sort_keys=True), "sha256": _digest_bytes(tensors),
                "format": f"crosslora-bases-{CACHE_VERSION}"}  # fmt: skip
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            save_file(dict(zip(("u", "s", "v"), tensors)), tmp, metadata=meta)
            os.replace(tmp, path)
            tmp = None
        except OSError as err:  # a full or read-only cache costs speed, never the transfer
            self.unwritable += 1
            if str(self.root) not in self._warned:
                self._warned.add(str(self.root))
                log.warning("warning: cannot write the basis cache in %s: %s", self.root,
                            err.strerror or err)  # fmt: skip
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
