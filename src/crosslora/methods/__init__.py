"""Transfer methods behind one interface (``base``) and a registry: adding a method is one module
or package here and its name in the import line below."""

from __future__ import annotations

from crosslora.errors import CrossLoraError
from crosslora.methods import anchored, copy, crop_pad, cross_lora, lora_x, matched  # noqa: F401
from crosslora.methods.anchored import AnchoredParams
from crosslora.methods.base import (
    METHODS,
    Calibration,
    Method,
    MethodOutput,
    ModuleContext,
    Params,
    Prepared,
    Unsupported,
)
from crosslora.methods.matched import MatchedParams

# The method `crosslora transfer` uses unless told otherwise.
DEFAULT_METHOD = "matched"

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "AnchoredParams",
    "Calibration",
    "MatchedParams",
    "Method",
    "MethodOutput",
    "ModuleContext",
    "Params",
    "Prepared",
    "Unsupported",
    "expectation",
    "get_method",
]

CARRIES_LITTLE = 0.05  # below this mean gap recovered, a method is said to carry almost nothing


def get_method(name: str, params: Params | None = None) -> Method:
    """The method ``name`` with ``params`` (None: its defaults); one line if either is wrong."""
    if name not in METHODS:
        raise CrossLoraError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    if params is not None and not isinstance(params, cls.params_type):
        raise CrossLoraError(
            f"method {name} takes {cls.params_type.__name__}, not {type(params).__name__}"
        )
    return cls(params)


def expectation(name: str) -> tuple[str, bool]:
    """What the benchmark says to expect of method ``name``, in one sentence, and whether that
    is a warning (the method measurably carries almost nothing of an adapter's effect)."""
    recovered = METHODS[name].recovered
    if recovered is None:
        return (f"{name} is not in the six-pair benchmark (docs/results.md): how much of the "
                "adapter survives is not measured", False)  # fmt: skip
    said = (f"on the six-pair benchmark {name} recovered {recovered:.2f} of a target-trained "
            "adapter's effect (mean NLL gap, docs/results.md)")  # fmt: skip
    if recovered < CARRIES_LITTLE:
        return said + "; it carries almost nothing: consider --method matched", True
    return said, False
