"""Every ``from_pretrained`` of crosslora, one way: code from a model's folder never runs.

A folder whose ``config.json`` or ``tokenizer_config.json`` maps its classes to Python files
beside the weights (``auto_map``) needs that code to load. Unless told otherwise, transformers
asks on standard input whether to run it, and a ``y`` there runs it. crosslora always passes
``trust_remote_code=False``, so it never asks and never runs it, and turns the refusal into one
line (a ``CrossLoraError``) that says so.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from crosslora.errors import CrossLoraError

# transformers' refusal with trust_remote_code=False ("... contains custom code which must be
# executed ..."); an auto_map in the folder also marks it
_CUSTOM_CODE = re.compile(r"custom code|trust_remote_code", re.IGNORECASE)


def load_causal_lm(folder: str | os.PathLike[str], what: str = "model", **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **kwargs)``."""
    from transformers import AutoModelForCausalLM

    refuse_remote_code(folder, what)
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except ValueError as err:
        _reraise_remote_code(err, folder, what)
        raise


def load_model(
    path: str | os.PathLike[str], device: torch.device, what: str,
    dtype: torch.dtype | str = torch.float32,
):  # fmt: skip
    """The whole causal LM on ``device`` in eval mode, in ``dtype`` (``"auto"``: its
    checkpoint's, bfloat16 for most); any failure to load is one line."""
    try:  # never code from the model's folder: trust_remote_code=False
        model = load_causal_lm(path, what, dtype=dtype)
    except CrossLoraError:
        raise
    except Exception as err:
        raise CrossLoraError(
            f"{what}: transformers cannot load {path} ({type(err).__name__}: {err})"
        ) from err
    return model.to(device).eval()


def load_config(folder: str | os.PathLike[str], what: str = "model", **kwargs: Any):
    """``AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)``."""
    from transformers import AutoConfig

    refuse_remote_code(folder, what)
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except ValueError as err:
        _reraise_remote_code(err, folder, what)
        raise


def load_tokenizer(folder: str | os.PathLike[str], what: str = "model", **kwargs: Any):
    """``AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)``."""
    from transformers import AutoTokenizer

    refuse_remote_code(folder, what)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except ValueError as err:
        _reraise_remote_code(err, folder, what)
        raise


def load_peft_adapter(model: Any, adapter: str | os.PathLike[str], **kwargs: Any):
    """``PeftModel.from_pretrained(model, adapter, trust_remote_code=False, **kwargs)``: PEFT
    runs no code of its own from an adapter folder; the keyword is for uniformity (and for any
    future PEFT that would pass it on). Pickle weights: check them with
    ``peft_adapter.check_adapter_weights`` first, as ``eval`` does."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), trust_remote_code=False, **kwargs)


def refuse_remote_code(folder: str | os.PathLike[str], what: str = "model") -> None:
    """Raise the one-line error before transformers is asked, when ``folder``'s config.json maps
    a model_type transformers does not know to code in the folder (transformers would refuse
    anyway, after a warning of its own)."""
    from transformers import CONFIG_MAPPING

    config = _read(Path(folder) / "config.json")
    model_type = config.get("model_type")
    if "auto_map" in config and not (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        detail = f"model_type {model_type!r}, auto_map in config.json"
        raise CrossLoraError(remote_code_message(folder, what, detail))


def remote_code_message(folder: str | os.PathLike[str], what: str, detail: str = "") -> str:
    """One line: the model needs its folder's code, which crosslora never runs."""
    return (
        f"{what} {folder}: the model needs Python code from its own folder"
        + (f" ({detail})" if detail else "")
        + "; crosslora never runs code from a model folder"
    )


def _reraise_remote_code(err: ValueError, folder: str | os.PathLike[str], what: str) -> None:
    if not _CUSTOM_CODE.search(str(err)):
        return
    mapped = [
        n for n in ("config.json", "tokenizer_config.json") if "auto_map" in _read(Path(folder) / n)
    ]
    detail = f"auto_map in {' and '.join(mapped)}" if mapped else ""
    raise CrossLoraError(remote_code_message(folder, what, detail)) from err


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def require_tokenizer(folder: str | os.PathLike[str], what: str):
    """``load_tokenizer``, with any failure one line: for methods that read both models'
    tokenizers (the probe text, the shared vocabulary)."""
    try:
        return load_tokenizer(folder, what)
    except CrossLoraError:
        raise
    except Exception as err:
        raise CrossLoraError(
            f"{what}: no usable tokenizer in {folder} ({type(err).__name__}); this method needs "
            "both models' tokenizers"
        ) from err
