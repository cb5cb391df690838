"""The transfer benchmark: for each (source, target) pair, how much of the target's own adapter
effect (the oracle's gap over the base) each method's transferred adapter recovers.

A config names the models (folder and own adapter), the pairs, the methods and the tasks. For
every pair it evaluates the target's base, the source adapter on its own model, the oracle (the
target's own adapter) and each method's transfer, then reports accuracy and NLL with
**gap recovered** = (transferred − base) / (oracle − base), with bootstrap 95 % intervals over
items ("undefined" when the oracle's gap is inside the noise).

Resumable: every transfer and every evaluation is cached under ``<out>/cache`` by a hash of what
changes it (a transfer is kept as its adapter folder), so a second run with the same inputs
evaluates nothing.

- ``config``: ``BenchConfig``, read and checked whole before anything runs;
- ``runner``: ``run_bench`` and ``Runner``, the transfers and evaluations, each cached;
- ``cache``: cache keys (inputs, method, options, version, ``behaviour_digest`` of the code);
- ``summary``: gap recovered, verdicts and ``results.md``; ``plot``: ``results.png``.
"""

from __future__ import annotations

from crosslora.bench.cache import ADAPTER_FILES, Cache, behaviour_digest, folder_identity
from crosslora.bench.config import BenchConfig
from crosslora.bench.plot import plot
from crosslora.bench.runner import Runner, model_folder, refuse_pickle_adapter, run_bench
from crosslora.bench.summary import GAP_METRICS, format_markdown, summarise, verdict

__all__ = [
    "ADAPTER_FILES",
    "GAP_METRICS",
    "BenchConfig",
    "Cache",
    "Runner",
    "behaviour_digest",
    "folder_identity",
    "format_markdown",
    "model_folder",
    "plot",
    "refuse_pickle_adapter",
    "run_bench",
    "summarise",
    "verdict",
]
