"""Zero-shot multiple-choice evaluation with lm-evaluation-harness's conventions.

``evaluate(model, tokenizer, tasks, split, limit, batch_size, device)`` scores already-loaded
models, so that a benchmark loads a base model once and evaluates it under many adapters. Its
result holds, per task, the metrics with standard errors and one record per item (id, gold,
per-choice log-likelihoods, character lengths and token counts) for bootstraps over items.

- ``spec``: what a task is (``TaskSpec``) and how a row becomes an ``Item``;
- ``tasks``: the built-in task table, task names to specs and items;
- ``data``: finding and reading rows (the benchmark data package, task files, a hub);
- ``scoring``: batched log-likelihood of continuations;
- ``metrics``: acc, acc_norm, NLL, standard errors, bootstrap intervals, gap recovered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from crosslora.device import resolve_device
from crosslora.errors import CrossLoraError
from crosslora.eval.data import require_data
from crosslora.eval.metrics import (
    GapRecovered,
    Interval,
    aggregate,
    bootstrap_ci,
    gap_recovered,
    item_metrics,
    plus_minus,
)
from crosslora.eval.scoring import check_items, score_items
from crosslora.eval.spec import Item, TaskSpec
from crosslora.eval.tasks import TASKS, load_items, resolve_tasks

__all__ = [
    "TASKS",
    "GapRecovered",
    "Interval",
    "Item",
    "TaskSpec",
    "bootstrap_ci",
    "evaluate",
    "format_table",
    "gap_recovered",
    "load_tasks",
]

log = logging.getLogger("crosslora")


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str | TaskSpec] | None = None,
    split: str = "validation",
    limit: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    *,
    strategy: str = "auto",
    add_special_tokens: bool | None = None,
    progress: bool = True,
    prepared: Sequence[tuple[TaskSpec, list[Item], str]] | None = None,
) -> dict:
    """Score ``model`` on ``tasks`` (names, ``.json`` task files or specs; ``None``: every
    built-in task with ``split``), the first ``limit`` items of each.

    ``device``: where to run; the model is moved there if given, else it stays where it is.
    ``add_special_tokens``: ``None`` keeps the tokenizer's default, as lm-eval does.
    ``prepared``: the tasks' items as ``load_tasks`` returns them (else loaded here, every task
    before any is scored, so that bad data fails before the first forward pass).

    Returns ``{"split", "limit", "scoring": {...}, "tasks": {name: {"n", "metrics", "items",
    ...}}}``; ``metrics`` maps acc, acc_norm, nll and nll_token to ``{"value", "stderr"}``.
    """
    if limit is not None and limit < 1:
        raise CrossLoraError("--limit must be at least 1")
    if batch_size < 1:
        raise CrossLoraError("--batch-size must be at least 1")
    if prepared is None:
        prepared = load_tasks(tasks, split, limit)
    if device is not None:
        model.to(resolve_device(device))
    run_device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result: dict = {
        "split": split,
        "limit": limit,
        "scoring": {
            "device": str(run_device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "strategy": strategy,
            "add_special_tokens": add_special_tokens,
            "loglik": "summed natural-log probability of the continuation tokens",
        },
        "tasks": {},
    }
    try:
        for spec, items, source in prepared:
            start = time.perf_counter()
            scores = score_items(
                model,
                tokenizer,
                items,
                batch_size=batch_size,
                device=run_device,
                strategy=strategy,
                add_special_tokens=add_special_tokens,
                progress=progress,
                desc=spec.name,
            )
            seconds = time.perf_counter() - start
            records = [_record(item, row) for item, row in zip(items, scores, strict=True)]
            result["tasks"][spec.name] = {
                "split": split,
                "source": source,
                "n": len(records),
                "lm_eval_task": spec.lm_eval_task,
                "lm_eval_metrics": list(spec.lm_eval_metrics),
                "metrics": aggregate(records),
                "seconds": seconds,
                "items_per_second": len(records) / seconds if seconds > 0 else None,
                "items": records,
            }
            log.debug("%s: %d items in %.1f s", spec.name, len(records), seconds)
    finally:
        if was_training:
            model.train()
    return result


def load_tasks(
    tasks: str | Sequence[str | TaskSpec] | None,
    split: str = "validation",
    limit: int | None = None,
    tokenizer=None,
) -> list[tuple[TaskSpec, list[Item], str]]:
    """(spec, the first ``limit`` items, their source) of every task, each checked: its data
    installed (``require_data``, for every task before any is read), rows that make items, at
    least one item, and (given the ``tokenizer``) continuations that encode to tokens. Needs no
    model, so a command can check its data before it loads one."""
    specs = resolve_tasks(tasks, split)
    require_data(specs, split)
    out = []
    for spec in specs:
        items, source = load_items(spec, split, limit)
        if not items:
            raise CrossLoraError(f"task {spec.name} ({split}, {source}) has no items")
        if tokenizer is not None:
            check_items(items, tokenizer, f"task {spec.name} ({split}, {source})")
        out.append((spec, items, source))
    return out


def _record(item: Item, row) -> dict:
    logliks = [s.loglik for s in row]
    chars = [len(c) for c in item.choice_texts]
    tokens = [s.n_tokens for s in row]
    return {
        "id": item.id,
        "gold": item.gold,
        "loglik": logliks,
        "char_len": chars,
        "n_tokens": tokens,
        "greedy": [s.greedy for s in row],
        **item_metrics(logliks, chars, tokens, item.gold),
    }


METRIC_DIGITS = (("acc", 4), ("acc_norm", 4), ("nll", 3), ("nll_token", 4))


def format_table(result: dict) -> str:
    """The per-task metrics as a fixed-width text table."""
    header = ("task", "split", "n", "acc", "acc_norm", "nll", "nll/token")
    rows = [header]
    for name, task in result["tasks"].items():
        m = task["metrics"]
        cells = [plus_minus(m[key], digits) for key, digits in METRIC_DIGITS]
        rows.append((name, task["split"], str(task["n"]), *cells))
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
