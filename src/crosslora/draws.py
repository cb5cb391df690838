"""``--draws N``: a method that draws random probe text runs the whole transfer N times, draw i
with its own independent text (``Method.for_draw``), and the adapter written is the mean of the N
updates, cut back to the adapter's rank once (``execute.assemble`` sums what meets in one target
role, so each draw's update enters divided by N). N times the time, for an adapter that depends
less on the draw (docs/results.md)."""

from __future__ import annotations

import logging

import torch

from crosslora.core import Inputs, ModuleResult
from crosslora.errors import CrossLoraError
from crosslora.execute import BasisSettings, execute_batch
from crosslora.io.spool import Spool
from crosslora.lora import LoraFactors
from crosslora.methods import METHODS, Method
from crosslora.plan import TransferPlan

log = logging.getLogger("crosslora")

# Per adapter: results to report (one per task), results to write (every draw's), diagnostics.
Drawn = tuple[list[ModuleResult], list[ModuleResult], dict]


def check_draws(draws: int, method: str) -> None:
    if draws < 1:
        raise CrossLoraError(f"--draws {draws}: must be at least 1")
    cls = METHODS.get(method)
    if draws > 1 and cls is not None and not cls.draws:
        drawing = " and ".join(sorted(name for name, m in METHODS.items() if m.draws))
        raise CrossLoraError(
            f"--draws {draws}: only {drawing} draws probe text; {method} gives the same adapter "
            "every time"
        )


def run_draws(
    method: Method, draws: int, batch: list[Inputs], plans: list[TransferPlan],
    device: torch.device, progress: bool, bases: BasisSettings, spool: Spool | None,
) -> list[Drawn]:  # fmt: skip
    """Run the batch ``draws`` times; per adapter, what to report and what to write."""
    runs = []  # per draw: per adapter, its results and the method's diagnostics
    for draw in range(draws):
        for plan in plans:
            plan.diagnostics = {}
        if draws > 1:
            log.info("draw %d of %d", draw + 1, draws)
        results = execute_batch(method.for_draw(draw), batch, plans, device, progress, bases,
                                spool)  # fmt: skip
        if draws > 1:
            for res in (r for rs in results for r in rs if r.skipped is None):
                f = res.factors
                res.factors = LoraFactors(f.A, f.B / draws, f.scale)
        runs.append([(r, dict(p.diagnostics)) for r, p in zip(results, plans)])
    return [_over_draws([run[i] for run in runs]) for i in range(len(plans))]


def _over_draws(runs: list[tuple[list[ModuleResult], dict]]) -> Drawn:
    """One adapter's draws. With one draw, its own results and diagnostics; with several, each
    task reports every draw's diagnostics and is skipped only where every draw skipped it, and
    the method's diagnostics are the list of the draws'."""
    if len(runs) == 1:
        ((results, diagnostics),) = runs
        return results, results, diagnostics
    report = []
    for rs in zip(*(results for results, _ in runs)):
        done = [r for r in rs if r.skipped is None]
        report.append(ModuleResult(
            rs[0].task, None,
            {"draws": [r.diagnostics if r.skipped is None else {"skipped": r.skipped} for r in rs]},
            sum(r.seconds for r in rs), None if done else rs[0].skipped,
        ))  # fmt: skip
    written = [r for results, _ in runs for r in results]
    return report, written, {"draws": [diagnostics for _, diagnostics in runs]}
