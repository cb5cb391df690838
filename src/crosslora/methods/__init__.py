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
    "get_method",
]


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
