"""Run plans module by module, then join the roles of fused target modules.

Each task reads its source factors (a row block of ``lora_B`` for a fused source module; ``A`` is
shared), runs the method on ``device`` in float32, and keeps the result on the CPU.

Streaming: base weights are read only by methods that need them, one (source, target) role pair
at a time, and dropped when that pair is done; tasks run grouped by the source weight's shard,
in shard order, then by layer, so reads sweep the checkpoint once and nothing is held across
layers. Finished factors are parked on disk (``Spool``) and read back one module at a time to be
written, so peak memory does not grow with depth. Several adapters from one source to one target
(a batch) share everything: the method's ``prepare`` runs once, and each role pair's weights and
SVD bases are loaded or computed once and applied to every adapter that adapts that role.
Bases come from the on-disk ``BasisCache`` when one is given.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from crosslora.arch.layout import ROLES, Layout, RoleRef, Slot
from crosslora.basis_cache import CACHE_VERSION, BasisCache
from crosslora.core import Inputs, ModuleResult, ModuleTask
from crosslora.io.spool import Spool
from crosslora.linalg import DEFAULT_FAST, DEFAULT_SVD, all_finite, svd_bases
from crosslora.lora import LoraFactors, refactor
from crosslora.methods import Calibration, Method, ModuleContext, Prepared, Unsupported
from crosslora.pair_cache import PairCache
from crosslora.plan import TransferPlan

log = logging.getLogger("crosslora")

CACHE_MIN_ELEMENTS = 1 << 18  # smaller weights (512 x 512) decompose faster than a cache read


@dataclass
class BasisSettings:
    """How SVD bases are obtained: the mode, and the cache (None: always computed); and where a
    method's preparation of the pair is kept (None: made each run)."""

    svd: str = DEFAULT_SVD
    cache: BasisCache | None = None
    cache_min_elements: int = CACHE_MIN_ELEMENTS
    pairs: PairCache | None = None


def source_factors(inputs: Inputs, task: ModuleTask) -> LoraFactors:
    """The role's own factors: ``A`` whole, ``B`` restricted to the role's rows."""
    lora = inputs.adapter.factors(task.adapter_module)
    rows = task.src.slot.rows[task.src.role]
    return lora if rows is None else LoraFactors(lora.A, lora.B[rows], lora.scale)


def _weight_loader(layout: Layout, ref: RoleRef, device: torch.device):
    def load() -> torch.Tensor:
        w = layout.weight(ref, device)
        if not all_finite(w):
            raise Unsupported(f"base weight {ref.label} contains NaN or Inf")
        return w

    return load


def basis_key(layout: Layout, ref: RoleRef, k_left: int, k_right: int, svd: str,
              device: torch.device) -> dict:  # fmt: skip
    """The cache key of one role's bases: the weight's file identity and how they are computed."""
    ckpt = layout.checkpoint
    name = ckpt.find(ref.slot.module)
    assert name is not None
    rows = ref.slot.rows[ref.role]
    return {
        "version": CACHE_VERSION,
        "weight": ckpt.identity(name),
        "role": ref.role,
        "rows": None if rows is None else hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
        "transposed": ref.slot.conv1d,
        "k": [k_left, k_right],
        "svd": svd,
        "fast": DEFAULT_FAST.key() if svd == "fast" else None,
        "device": device.type,
        "torch": torch.__version__,
    }


def _basis_source(inputs: Inputs, task: ModuleTask, device: torch.device, bases: BasisSettings):
    def source(side: str, k_left: int, k_right: int, load: Callable[[], torch.Tensor]):
        layout, ref = (inputs.src, task.src) if side == "src" else (inputs.tgt, task.tgt)
        compute = lambda: svd_bases(load(), k_left, k_right, bases.svd)  # noqa: E731
        m, n = ref.shape
        if bases.cache is None or m * n < bases.cache_min_elements:
            return compute()
        key = basis_key(layout, ref, k_left, k_right, bases.svd, device)
        return bases.cache.get(key, compute)

    return source


def _pair_id(task: ModuleTask) -> tuple:
    return (task.src.slot.module, task.src.role, task.tgt.slot.module, task.tgt.role)


def _read_order(inputs: Inputs, task: ModuleTask) -> tuple:
    """Source shard, then layers, then role: a sweep through the checkpoint in file order."""
    ckpt = inputs.src.checkpoint
    name = ckpt.find(task.src.slot.module)
    shard = ckpt.shard_rank(name) if name is not None else 0
    return (shard, task.src.layer, task.tgt.layer, ROLES.index(task.src.role), _pair_id(task))


def execute_batch(
    method: Method, batch: list[Inputs], plans: list[TransferPlan], device: torch.device,
    progress: bool = True, bases: BasisSettings | None = None, spool: Spool | None = None,
) -> list[list[ModuleResult]]:  # fmt: skip
    """Run several plans with one method between one source and one target model.

    ``batch[i]`` and ``plans[i]`` belong to adapter i; the inputs share the two layouts. After the
    last module, the method may calibrate each adapter's results as a whole, and its calibration
    is applied here. Returns, per adapter, its results in its plan's task order, their factors
    parked in ``spool`` if one is given (else held in memory). What the method parks for itself
    goes to a second spool beside it, gone when this returns.
    """
    with Spool(spool.folder, spool.label) if spool is not None else nullcontext() as scratch:
        return _execute(method, batch, plans, device, progress, bases or BasisSettings(), spool,
                        scratch)  # fmt: skip


def _execute(
    method: Method, batch: list[Inputs], plans: list[TransferPlan], device: torch.device,
    progress: bool, bases: BasisSettings, spool: Spool | None, scratch: Spool | None,
) -> list[list[ModuleResult]]:  # fmt: skip
    """``execute_batch``'s work, with ``scratch`` the method's own spool."""
    first = batch[0]
    prepared = method.prepare(first.src, first.tgt, device, scratch, cache=bases.pairs)
    for plan in plans:
        plan.diagnostics.update(prepared.diagnostics)
    done: list[dict[tuple, ModuleResult]] = [{} for _ in plans]
    total = sum(len(p.tasks) for p in plans)
    desc = f"transfer ({plans[0].method})" + (f", {len(plans)} adapters" if len(plans) > 1 else "")
    bar = tqdm(total=total, desc=desc, unit="module", disable=not progress)
    with bar, logging_redirect_tqdm(loggers=[log]):  # warnings on their own lines, not the bar's
        for members, ctx in _contexts(first, _groups(first, plans), plans, device, bases):
            for i, task in members:
                res = _run_task(batch[i], method, prepared, task, plans[i], ctx)
                res.spool = spool
                res.factors = res.stored  # parked, if there is a spool
                done[i][_pair_id(task)] = res
                bar.update()
    results = [[done[i][_pair_id(t)] for t in plan.tasks] for i, plan in enumerate(plans)]
    for inputs, plan, res in zip(batch, plans, results):
        if any(r.skipped is None for r in res):
            calibration = method.calibrate(inputs, res, prepared)
            if calibration is not None:
                apply_calibration(res, calibration)
                plan.diagnostics.update(calibration.diagnostics)
    return results


def prepare_modules(
    method: Method, batch: list[Inputs], plans: list[TransferPlan], device: torch.device,
    bases: BasisSettings, progress: bool = True,
) -> Prepared:  # fmt: skip
    """The method's preparation of the pair and what each module of these plans makes that a
    later adapter reads (``Method.prepare_module``), kept in ``bases.pairs``; no adapter is
    transferred. Run once before a collection fans out, so that no task makes them again."""
    first = batch[0]
    with Spool() as scratch:
        prepared = method.prepare(first.src, first.tgt, device, scratch, cache=bases.pairs)
        groups = _groups(first, plans)
        bar = tqdm(total=len(groups), desc=f"prepare ({plans[0].method})", unit="module",
                   disable=not progress)  # fmt: skip
        with bar, logging_redirect_tqdm(loggers=[log]):
            for _members, ctx in _contexts(first, groups, plans, device, bases):
                method.prepare_module(ctx, prepared)
                bar.update()
    return prepared


def _groups(first: Inputs, plans: list[TransferPlan]) -> list[list[tuple[int, ModuleTask]]]:
    """The plans' tasks grouped by (source, target) role pair, in read order (``_read_order``):
    each group's members as (plan index, task)."""
    groups: dict[tuple, list[tuple[int, ModuleTask]]] = {}
    for i, plan in enumerate(plans):
        for task in plan.tasks:
            groups.setdefault(_pair_id(task), []).append((i, task))
    order = sorted(groups, key=lambda pid: _read_order(first, groups[pid][0][1]))
    return [groups[pid] for pid in order]


def _contexts(
    first: Inputs, groups: list[list[tuple[int, ModuleTask]]], plans: list[TransferPlan],
    device: torch.device, bases: BasisSettings,
) -> Iterator[tuple[list[tuple[int, ModuleTask]], ModuleContext]]:  # fmt: skip
    """Each group's tasks (``_groups``) and its context. A context loads its weights and bases
    on first use, so the caller's previous one is gone (rebound) before the next one loads:
    nothing is held across role pairs."""
    for members in groups:
        task0 = members[0][1]
        ctx = ModuleContext(
            task0.src.shape, task0.tgt.shape, device, plans[0].truncation_rank,
            _weight_loader(first.src, task0.src, device),
            _weight_loader(first.tgt, task0.tgt, device),
            task0.src, task0.tgt, first.src, first.tgt, bases.svd,
            _basis_source(first, task0, device, bases),
        )  # fmt: skip
        yield members, ctx
        del ctx


def apply_calibration(results: list[ModuleResult], calibration: Calibration) -> None:
    """Multiply each result's ``B`` by its calibration factors, one after the other, and add the
    calibration's diagnostics to its own."""
    for res, factors, diagnostics in zip(
        results, calibration.scales, calibration.module_diagnostics
    ):
        res.diagnostics.update(diagnostics)
        if res.skipped is None:
            for c in factors:
                f = res.factors  # read back once if parked
                res.factors = LoraFactors(f.A, f.B * c, f.scale)


def _run_task(
    inputs: Inputs, method: Method, prepared: Prepared, task: ModuleTask, plan: TransferPlan,
    ctx: ModuleContext,
) -> ModuleResult:  # fmt: skip
    """One task: the source factors, the method, the checks on what it returned."""
    start = time.perf_counter()
    lora = source_factors(inputs, task)
    if not lora.is_finite():
        return _skip(task, "the adapter's factors contain NaN or Inf")
    try:
        out = method.transfer(lora.to(ctx.device), ctx, prepared)
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


def adapted_modules(results: list[ModuleResult]) -> list[str]:
    """The target module paths that receive a LoRA, sorted."""
    return sorted({r.task.tgt.slot.module for r in results if r.skipped is None})


def assemble(results: list[ModuleResult]) -> Iterator[tuple[str, LoraFactors]]:
    """``(target module path, its LoRA factors)`` in ``adapted_modules`` order, joining the roles
    of fused modules. Built one module at a time (parked factors are read back as needed), so
    writing them costs the memory of one module, not of the adapter.

    Several results for one target role (the ``merge`` layer map) add: their factors stack and
    the sum is re-factorised to the largest of their ranks (``merge_updates``); so do the draws
    of ``--draws``, each already divided by their number (``draws``)."""
    by_slot: dict[str, tuple[Slot, dict[str, list[ModuleResult]]]] = {}
    for res in results:
        if res.skipped is not None:
            continue
        slot = res.task.tgt.slot
        by_slot.setdefault(slot.module, (slot, {}))[1].setdefault(res.task.tgt.role, []).append(res)
    for module in sorted(by_slot):
        slot, parts = by_slot[module]
        yield (
            module,
            join_roles(
                slot,
                {
                    role: merge_updates([r.factors for r in rs]) for role, rs in parts.items()
                },  # fmt: skip
            ),
        )


def merge_updates(parts: list[LoraFactors]) -> LoraFactors:
    """``Σ scale_i B_i A_i`` as one LoRA of rank ``max r_i``: the best rank-r approximation of the
    sum (exact when the parts' sum has that rank), computed from the stacked factors."""
    if len(parts) == 1:
        return parts[0]
    scale = parts[0].scale
    A = torch.cat([p.A for p in parts], dim=0)
    B = torch.cat([p.B * (p.scale / scale) for p in parts], dim=1)
    return refactor(LoraFactors(A, B, scale), max(p.r for p in parts))
