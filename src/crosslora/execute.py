"""Run a plan module by module, then join the roles of fused target modules.

Each task reads its source factors (a row block of ``lora_B`` for a fused source module; ``A`` is
shared), runs the method on ``device`` in float32, and keeps the result on the CPU. Base weights
are read only by methods that need them, one task at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from crosslora.arch.layout import Layout, RoleRef, Slot
from crosslora.lora import LoraFactors
from crosslora.methods import Method, ModuleContext, Unsupported, get_method
from crosslora.plan import Inputs, ModuleTask, TransferPlan

log = logging.getLogger("crosslora")


@dataclass
class ModuleResult:
    task: ModuleTask
    factors: LoraFactors | None  # None when skipped
    diagnostics: dict = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None


def source_factors(inputs: Inputs, task: ModuleTask) -> LoraFactors:
    """The role's own factors: ``A`` whole, ``B`` restricted to the role's rows."""
    lora = inputs.adapter.factors(task.adapter_module)
    rows = task.src.slot.rows[task.src.role]
    return lora if rows is None else LoraFactors(lora.A, lora.B[rows], lora.scale)


def _weight_loader(layout: Layout, ref: RoleRef, device: torch.device):
    def load() -> torch.Tensor:
        w = layout.weight(ref, device)
        if not torch.isfinite(w).all():
            raise Unsupported(f"base weight {ref.label} contains NaN or Inf")
        return w

    return load


def execute(
    inputs: Inputs, plan: TransferPlan, device: torch.device, progress: bool = True
) -> list[ModuleResult]:
    method = get_method(plan.method)
    plan.diagnostics.update(method.prepare(inputs.src, inputs.tgt, device))
    results = []
    bar = tqdm(plan.tasks, desc=f"transfer ({plan.method})", unit="module", disable=not progress)
    with logging_redirect_tqdm(loggers=[log]):  # warnings on their own lines, not on the bar's
        for task in bar:
            results.append(_run_task(inputs, method, task, plan, device))
    return results


def _run_task(
    inputs: Inputs, method: Method, task: ModuleTask, plan: TransferPlan, device: torch.device
) -> ModuleResult:
    """One task: the source factors, the method, the checks on what it returned."""
    start = time.perf_counter()
    lora = source_factors(inputs, task)
    if not lora.is_finite():
        return _skip(task, "the adapter's factors contain NaN or Inf")
    ctx = ModuleContext(
        task.src.shape, task.tgt.shape, device, plan.truncation_rank,
        _weight_loader(inputs.src, task.src, device),
        _weight_loader(inputs.tgt, task.tgt, device),
        task.src, task.tgt, inputs.src, inputs.tgt,
    )  # fmt: skip
    try:
        out = method.transfer(lora.to(device), ctx)
    except Unsupported as why:
        return _skip(task, str(why))
    factors = out.factors
    if factors.shape != task.tgt.shape or factors.r > lora.r:
        raise AssertionError(f"{plan.method} returned {factors.shape} r={factors.r} for {task.tgt}")
    if not factors.is_finite():
        return _skip(task, f"{plan.method} produced NaN or Inf")
    seconds = time.perf_counter() - start
    return ModuleResult(task, factors.to("cpu"), out.diagnostics, seconds)


def _skip(task: ModuleTask, reason: str) -> ModuleResult:
    log.warning("warning: skipping %s: %s", task.src.label, reason)
    return ModuleResult(task, None, skipped=reason)


def join_roles(slot: Slot, parts: dict[str, LoraFactors]) -> LoraFactors:
    """One LoRA for a (possibly fused) target module from its roles' factors, still factored.

    When every part shares ``A`` (and scale), ``B`` stacks into the role rows and the rank stays
    r; otherwise ``A`` stacks the parts' ``A`` and ``B`` is block-structured (rank Σ r_i), which
    is exact. Rows of roles with no part stay zero. Scales differing between parts are baked
    into ``B`` relative to the first part's.
    """
    if len(slot.roles) == 1:
        (only,) = parts.values()
        return only
    parts = {role: parts[role] for role in slot.roles if role in parts}
    first = next(iter(parts.values()))
    shared = all(p.A.shape == first.A.shape and torch.equal(p.A, first.A) for p in parts.values())
    shared = shared and all(p.scale == first.scale for p in parts.values())
    total = first.r if shared else sum(p.r for p in parts.values())
    B = first.B.new_zeros(slot.out_features, total)
    As, col = [], 0
    for role, p in parts.items():
        rows = slot.rows[role]
        b = p.B if p.scale == first.scale else p.B * (p.scale / first.scale)
        if shared:
            B[rows] = b
        else:
            B[rows, col : col + p.r] = b
            As.append(p.A)
            col += p.r
    A = first.A if shared else torch.cat(As, dim=0)
    return LoraFactors(A, B, first.scale)


def assemble(results: list[ModuleResult]) -> dict[str, LoraFactors]:
    """Target module path -> its LoRA factors, joining the roles of fused modules."""
    by_slot: dict[str, tuple[Slot, dict[str, LoraFactors]]] = {}
    for res in results:
        if res.factors is None:
            continue
        slot = res.task.tgt.slot
        by_slot.setdefault(slot.module, (slot, {}))[1][res.task.tgt.role] = res.factors
    return {module: join_roles(slot, parts) for module, (slot, parts) in by_slot.items()}
