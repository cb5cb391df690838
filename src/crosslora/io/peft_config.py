"""The ``adapter_config.json`` half of the PEFT contract: every field crosslora reads, checked
for type and range before any work, and PEFT's rules for which modules ``target_modules``,
``rank_pattern`` and ``alpha_pattern`` select (matched in bounded time, ``patterns``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from crosslora.errors import CrossLoraError
from crosslora.io import patterns
from crosslora.io.checkpoint import read_json


@dataclass(frozen=True)
class ModulePatterns:
    """What the config's patterns say of each module name (PEFT's rules, ``io/patterns.py``)."""

    targeted: list[bool]  # in target_modules (a list: suffix match; a string: fullmatch)
    rank_key: list[str | None]  # the rank_pattern key that gives its rank (first match)
    alpha_key: list[str | None]


_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "target_modules")


def module_patterns(config: dict, modules: list[str]) -> ModulePatterns:
    """Match ``modules`` against the (validated) config's ``target_modules``, ``rank_pattern``
    and ``alpha_pattern`` keys, in bounded time: a pattern that backtracks catastrophically is a
    ``CrossLoraError`` naming it, after ``patterns.LIMIT_SECONDS`` at most."""
    target_modules = config.get("target_modules")
    rank, alpha = list(config.get("rank_pattern") or {}), list(config.get("alpha_pattern") or {})
    jobs: list[patterns.Job] = [("suffix", rank, modules), ("suffix", alpha, modules)]
    if isinstance(target_modules, str):
        jobs.append(("full", [target_modules], modules))
    try:
        found = patterns.first_matches(jobs)
    except patterns.PatternTimeout as err:
        field_name = _PATTERN_FIELDS[err.job]
        which = "" if err.pattern is None else f" {jobs[err.job][1][err.pattern]!r}"
        which = f" key{which}" if field_name != "target_modules" and which else which
        raise CrossLoraError(
            f"adapter config: {field_name}{which} did not finish matching module "
            f"{ascii(modules[err.name])[:100]} in {patterns.LIMIT_SECONDS:g} s (catastrophic "
            "backtracking, as with nested quantifiers like (a+)+); simplify the pattern"
        ) from None
    except patterns.PatternFailure as err:
        raise CrossLoraError(
            f"adapter config: matching target_modules/rank_pattern/alpha_pattern against the "
            f"adapter's module names failed ({err})"
        ) from None
    if target_modules is None:
        targeted = [True] * len(modules)
    elif isinstance(target_modules, str):
        targeted = [hit is not None for hit in found[2]]
    else:
        listed = set(target_modules)
        lengths = sorted({len(t) for t in listed})
        targeted = [_listed(m, listed, lengths) for m in modules]
    return ModulePatterns(
        targeted,
        [None if i is None else rank[i] for i in found[0]],
        [None if i is None else alpha[i] for i in found[1]],
    )


def _listed(module: str, listed: set[str], lengths: list[int]) -> bool:
    """PEFT's rule for a list: ``module == t or module.endswith(f".{t}")`` for some listed ``t``
    (one set look-up per listed length, not one scan per listed name)."""
    n = len(module)
    return any(
        module[n - k :] in listed and (k == n or module[n - k - 1] == ".")
        for k in lengths
        if k <= n
    )


def _field(config: dict, name: str, types: type | tuple[type, ...], default: object) -> object:
    value = config.get(name, default)
    if value is default:
        return value
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise CrossLoraError(
            f"adapter config: field {name!r} has the wrong type ({type(value).__name__}: {value!r})"
        )
    return value


def read_adapter_config(path: Path) -> dict:
    """Read ``adapter_config.json``; refuse what is unsupported; check every field we use.

    Any problem is a ``CrossLoraError`` naming the file or the field.
    """
    config = read_json(path, "adapter config")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CrossLoraError(
            f"adapter config: peft_type {peft_type!r} is not supported (only LORA)"
        )
    if config.get("use_dora"):
        raise CrossLoraError("adapter config: DoRA adapters (use_dora=true) are not supported")
    if config.get("lora_bias"):
        raise CrossLoraError("adapter config: LoRA biases (lora_bias=true) are not supported")
    _check_fields(config)
    return config


_NUMBER = (int, float)


def _check_fields(config: dict) -> None:
    r = _field(config, "r", int, 8)
    if r <= 0:
        raise CrossLoraError(f"adapter config: r must be positive, got {r}")
    lora_alpha = _finite(_field(config, "lora_alpha", _NUMBER, 8), "lora_alpha")
    if lora_alpha <= 0:  # scale alpha / r: zero writes a null adapter, negative flips its sign
        raise CrossLoraError(f"adapter config: lora_alpha must be positive, got {lora_alpha:g}")
    _field(config, "use_rslora", bool, False)
    _field(config, "fan_in_fan_out", bool, False)
    dropout = _field(config, "lora_dropout", (*_NUMBER, type(None)), None)
    if dropout is not None and not 0 <= _finite(dropout, "lora_dropout") < 1:
        raise CrossLoraError(f"adapter config: lora_dropout must be in [0, 1), got {dropout!r}")
    task_type = _field(config, "task_type", (str, type(None)), None)
    if task_type not in (None, *_TASK_TYPES) and task_type not in _task_types():  # copied out
        raise CrossLoraError(
            f"adapter config: task_type {ascii(task_type)[:60]} is not a PEFT task type "
            f"(one of {', '.join(_task_types())})"
        )
    _field(config, "base_model_name_or_path", (str, type(None)), None)
    _field(config, "modules_to_save", (list, type(None)), None)
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = _field(config, name, (dict, type(None)), None) or {}
        for key, value in pattern.items():
            ok_type = int if name == "rank_pattern" else _NUMBER
            if isinstance(value, bool) or not isinstance(value, ok_type) or value <= 0:
                kind = "a positive integer" if name == "rank_pattern" else "a positive number"
                raise CrossLoraError(f"adapter config: {name}[{key!r}] must be {kind}")
            _finite(value, f"{name}[{key!r}]")
            _compiles(key, "suffix", f"{name} key {key!r}")
    target_modules = _field(config, "target_modules", (list, str, type(None)), None)
    if isinstance(target_modules, list) and not all(isinstance(t, str) for t in target_modules):
        raise CrossLoraError("adapter config: field 'target_modules' must list strings")
    if isinstance(target_modules, str):
        _compiles(target_modules, "full", "target_modules")
    target_parameters = _field(config, "target_parameters", (list, type(None)), None) or []
    if not all(isinstance(t, str) for t in target_parameters):
        raise CrossLoraError("adapter config: field 'target_parameters' must list strings")
    layers = _field(config, "layers_to_transform", (int, list, type(None)), None)
    if isinstance(layers, int) and layers < 0:
        raise CrossLoraError(f"adapter config: layers_to_transform must be >= 0, got {layers}")
    if isinstance(layers, list) and not all(
        type(x) is int and x >= 0 for x in layers
    ):  # fmt: skip
        raise CrossLoraError("adapter config: field 'layers_to_transform' must list layer indices")


def _finite(value: object, name: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise CrossLoraError(f"adapter config: {name} must be a finite number, got {value!r}")
    return number


def _compiles(pattern: str, mode: str, what: str) -> None:
    """``pattern`` compiles, alone and as PEFT runs it (compiling is cheap; matching is bounded
    in ``module_patterns``)."""
    for text in (pattern, patterns.wrapped(pattern, mode)):
        try:
            re.compile(text)
        except (re.error, RecursionError, OverflowError, MemoryError) as err:
            raise CrossLoraError(f"adapter config: {what} is not a regex ({err})") from err


# PEFT's TaskType values (peft.utils.peft_types); a value outside them is looked up in the
# installed PEFT, whose LoraConfig writes the output's config
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
               "FEATURE_EXTRACTION")  # fmt: skip


def _task_types() -> tuple[str, ...]:
    try:
        from peft.utils.peft_types import TaskType
    except ImportError:  # pragma: no cover - peft is a dependency
        return _TASK_TYPES
    return tuple(t.value for t in TaskType)
