"""An on-disk cache of a method's preparation for a pair of models, shared by every later transfer
between the same two checkpoints with the same parameters (``matched``: the probe text and the
activations at its aligned positions, and the bases' log-likelihoods of the calibration text).

An entry is a folder named by the SHA-256 of its key (both checkpoints' file identities, the
tokenizers' files, the method's parameters, the library versions that decide the numbers, the
device type) holding its files and a ``manifest.json`` with their SHA-256. It is written in a
staging folder beside it and renamed into place whole, so a reader sees a whole entry or none;
two runs preparing the same pair at once both write, the first rename wins and the other's
staging folder goes. On read every file is checked against the manifest: a corrupt or foreign
entry is removed and prepared again, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from crosslora.paths import crosslora_home

log = logging.getLogger("crosslora")

PAIR_CACHE_VERSION = 1
MANIFEST = "manifest.json"


def default_pair_dir() -> Path:
    """``$CROSSLORA_HOME/pairs``, else ``~/.cache/crosslora/pairs``."""
    return crosslora_home() / "pairs"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


@dataclass
class PairCache:
    """``find(key)``: a verified entry's folder, or None; ``writing(key)``: a folder to fill,
    published as the entry when the block ends without an error."""

    root: Path
    hits: int = 0
    made: int = 0
    corrupt: int = 0

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def stats(self) -> dict:
        return {"dir": str(self.root), "hits": self.hits, "made": self.made,
                "corrupt_remade": self.corrupt}  # fmt: skip

    def path_for(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / digest

    def find(self, key: dict, count: bool = True) -> Path | None:
        """The entry's folder, verified; None if absent or corrupt (then removed). ``count``:
        a hit counts in ``stats`` (not the read-back of an entry just made)."""
        path = self.path_for(key)
        if not path.is_dir():
            return None
        why = _why_corrupt(path, key)
        if why is None:
            self.hits += count
            return path
        self.corrupt += 1
        log.warning("warning: pair cache entry %s is corrupt (%s); preparing it again", path, why)
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
        return None

    @contextlib.contextmanager
    def writing(self, key: dict, count: bool = True) -> Iterator[Path]:
        """A staging folder to write the entry's files in; on a clean exit its manifest is
        written and it is renamed into place (unless another run's entry got there first).
        ``count``: the entry counts in ``stats`` as made."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield staging
            files = {p.name: file_digest(p) for p in sorted(staging.iterdir())}
            manifest = {"key": key, "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
            try:
                os.rename(staging, path)
                self.made += count
            except OSError:  # another run's entry is in place: it is the same
                pass
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _why_corrupt(path: Path, key: dict) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("key") != key:
            return "its key does not match"
        files = manifest["files"]
        present = {p.name for p in path.iterdir()} - {MANIFEST}
        if present != set(files):
            return "its files are not the manifest's"
        for name, digest in files.items():
            if file_digest(path / name) != digest:
                return f"{name}: checksum mismatch"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable manifest: {err}"
    return None
