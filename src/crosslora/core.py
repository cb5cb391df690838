"""The types every stage of a transfer shares: the resolved inputs, one module's task and its
result. The plan makes tasks, the methods and the executor turn them into results, the report
reads them; keeping the types here lets each of those import downward only."""

from __future__ import annotations

from dataclasses import dataclass, field

from crosslora.arch.layout import Layout, RoleRef
from crosslora.hooks import Update
from crosslora.io.peft_adapter import Adapter
from crosslora.io.spool import ParkedFactors, Spool
from crosslora.lora import LoraFactors


@dataclass
class Inputs:
    """The resolved inputs: the source adapter and both base models' layouts."""

    adapter: Adapter
    src: Layout
    tgt: Layout
    src_name: str
    tgt_name: str


@dataclass(frozen=True)
class ModuleTask:
    """Transfer one role: ``src`` (in the adapter's module ``adapter_module``) to ``tgt``."""

    src: RoleRef
    tgt: RoleRef
    adapter_module: str


@dataclass(frozen=True)
class Skip:
    what: str
    reason: str


@dataclass
class ModuleResult:
    """One task's outcome. ``factors`` (None when skipped) live in memory, or parked in ``spool``
    and read back on each access."""

    task: ModuleTask
    stored: LoraFactors | ParkedFactors | None
    diagnostics: dict = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None
    spool: Spool | None = None

    @property
    def factors(self) -> LoraFactors | None:
        f = self.stored
        return self.spool.load(f) if isinstance(f, ParkedFactors) and self.spool else f

    @factors.setter
    def factors(self, f: LoraFactors | None) -> None:
        self.stored = self.spool.park(f) if f is not None and self.spool else f


def source_updates(inputs: Inputs, tasks: list[ModuleTask]) -> list[Update]:
    """The source adapter as forward-hook updates of the source model: one per module role the
    ``tasks`` read (a fused module's role keeps only its rows of ``B``)."""
    seen: dict[tuple, Update] = {}
    for task in tasks:
        src = task.src
        key = (src.slot.module, src.role)
        if key not in seen:
            lora = inputs.adapter.factors(task.adapter_module).to("cpu")
            rows = src.slot.rows[src.role]
            B = lora.B if rows is None else lora.B[rows]
            seen[key] = Update(src.slot.module, rows, lora.A, B, lora.scale)
    return list(seen.values())
