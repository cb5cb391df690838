"""crosslora: move a LoRA adapter from one base LLM to another, without data or training.

The public API::

    from crosslora import TransferOptions, transfer

    report = transfer("adapter/", "source-model", "target-model", "out/adapter",
                      TransferOptions(method="matched", device="cuda"))

- ``transfer(adapter, source_model, target_model, out_path, options=None, overwrite=False,
  progress=True) -> dict``: one adapter; returns the report also written as
  ``transfer_report.json``.
- ``transfer_batch(adapters, source_model, target_model, out_parent, ...) -> list[dict]``:
  several adapters for one pair of models in one pass, each to ``<out_parent>/<its name>/``.
- ``plan_transfers(adapters, source_model, target_model, options)``: the plans, from headers
  alone (what ``--dry-run`` prints); nothing is written.
- ``TransferOptions``: the method, layer map, device, dtype, ... and the method's own parameters
  (``MatchedParams``, ``AnchoredParams``); ``refine=RefineParams(...)`` adds the opt-in
  training stage after the transfer (``--refine``).

Errors a caller can cause raise ``CrossLoraError`` with a one-line message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crosslora.errors import CrossLoraError
from crosslora.version import __version__

if TYPE_CHECKING:
    from crosslora.methods import AnchoredParams, MatchedParams
    from crosslora.pipeline import TransferOptions, plan_transfers, transfer, transfer_batch
    from crosslora.refine import RefineParams

__all__ = [
    "AnchoredParams",
    "CrossLoraError",
    "MatchedParams",
    "RefineParams",
    "TransferOptions",
    "__version__",
    "plan_transfers",
    "transfer",
    "transfer_batch",
]

_LAZY = {
    "TransferOptions": "crosslora.pipeline",
    "plan_transfers": "crosslora.pipeline",
    "transfer": "crosslora.pipeline",
    "transfer_batch": "crosslora.pipeline",
    "AnchoredParams": "crosslora.methods",
    "MatchedParams": "crosslora.methods",
    "RefineParams": "crosslora.refine.params",
}


def __getattr__(name: str) -> Any:
    """The API's heavier names load on first use, so that ``import crosslora`` (and every
    ``crosslora.*`` module, which imports this package first) stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crosslora' has no attribute {name!r}")
