"""Transfer methods behind one interface; adding a method is adding one module here."""

from __future__ import annotations

from crosslora.errors import CrossLoraError
from crosslora.methods import anchored, copy, crop_pad, cross_lora, lora_x, matched  # noqa: F401
from crosslora.methods.base import METHODS, Method, MethodOutput, ModuleContext, Unsupported

# The method `crosslora transfer` uses unless told otherwise.
DEFAULT_METHOD = "matched"

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "MethodOutput",
    "ModuleContext",
    "Unsupported",
    "get_method",
]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CrossLoraError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]()
