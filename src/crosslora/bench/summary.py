"""What a benchmark found: gap recovered per pair, method and metric, and its markdown table.

**Gap recovered** = (transferred − base) / (oracle − base), the share of the target's own
adapter's improvement that the transfer also gives, with a bootstrap 95 % interval over items
(paired: the same items resampled together), pooled over tasks and per task. The verdict
(helped, hurt, inconclusive) reads the transferred − base interval alone.
"""

from __future__ import annotations

from crosslora.bench.config import BenchConfig
from crosslora.eval.metrics import gap_recovered, item_values, plus_minus
from crosslora.version import __version__

GAP_METRICS = ("acc", "acc_norm", "nll")


def _gap(base: dict, transferred: dict, oracle: dict, tasks: list[str], metric: str,
         n_resamples: int, seed: int) -> dict:  # fmt: skip
    """Gap recovered of ``metric`` over the items of ``tasks`` that all three results hold."""
    cols: list[list[float]] = [[], [], []]
    for task in tasks:
        maps = [item_values(r["tasks"][task], metric) for r in (base, transferred, oracle)]
        ids = [k for k in maps[0] if k in maps[1] and k in maps[2]]
        for col, m in zip(cols, maps):
            col.extend(m[k] for k in ids)
    g = gap_recovered(*cols, n_resamples=n_resamples, seed=seed)
    return {**g.as_dict(), "text": str(g), "n": len(cols[0])}


def verdict(gap: dict, metric: str) -> str:
    """helped / hurt / inconclusive, from the transferred − base interval alone."""
    d = gap["transferred_minus_base"]
    sign = -1.0 if metric == "nll" else 1.0  # lower NLL is better
    low, high = sorted((sign * d["low"], sign * d["high"]))
    return "helped" if low > 0 else "hurt" if high < 0 else "inconclusive"


def summarise(config: BenchConfig, evals: dict[tuple, dict]) -> dict:
    """``results.json``: settings, and per pair every configuration's metrics and every
    method's gaps. ``evals`` maps (model, "base" | "own") and (source, target, method) to
    ``evaluate`` results."""
    tasks = list(next(iter(evals.values()))["tasks"])  # names (config entries may be files)
    rows = []
    for s, t in config.pairs:
        base, oracle, source = evals[(t, "base")], evals[(t, "own")], evals[(s, "own")]
        entry = {"source": s, "target": t, "configs": {}, "methods": {}}
        for label, res in (
            ("base", base),
            ("oracle", oracle),
            ("source adapter on source", source),
        ):
            entry["configs"][label] = {task: res["tasks"][task]["metrics"] for task in tasks}
        for m in config.methods:
            res = evals[(s, t, m)]
            entry["configs"][m] = {task: res["tasks"][task]["metrics"] for task in tasks}
            gaps = {}
            for metric in GAP_METRICS:
                per_task = {task: _gap(base, res, oracle, [task], metric, config.n_resamples,
                                       config.seed) for task in tasks}  # fmt: skip
                pooled = _gap(base, res, oracle, tasks, metric, config.n_resamples,
                              config.seed)  # fmt: skip
                pooled["verdict"] = verdict(pooled, metric)
                gaps[metric] = {"all": pooled, **per_task}
            entry["methods"][m] = gaps
        rows.append(entry)
    return {
        "crosslora_version": __version__,
        "settings": {
            "tasks": tasks,
            "split": config.split,
            "limit": config.limit,
            "methods": config.methods,
            "n_resamples": config.n_resamples,
            "transfer": config.transfer,
        },  # fmt: skip
        "pairs": rows,
    }


def format_markdown(results: dict) -> str:
    """``results.md``: the pooled gaps with verdicts, then every pair's per-task table."""
    s = results["settings"]
    lines = [
        "# Transfer benchmark",
        "",
        f"Tasks {', '.join(s['tasks'])} ({s['split']}, first {s['limit'] or 'all'} items each); "
        "gap recovered = (transferred − base) / (oracle − base) with a "
        f"{s['n_resamples']}-resample bootstrap 95 % interval over items, pooled over tasks. "
        "*undefined*: the oracle does not beat the base beyond the noise. Verdict: whether "
        "transferred − base is outside the noise.",
        "",
        "## Gap recovered, all tasks pooled",
        "",
        "| source → target | method | NLL gap recovered | NLL verdict | acc_norm gap recovered "
        "| acc_norm verdict |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        for m, gaps in p["methods"].items():
            lines.append(
                f"| {p['source']} → {p['target']} | {m} | {gaps['nll']['all']['text']} | "
                f"{gaps['nll']['all']['verdict']} | {gaps['acc_norm']['all']['text']} | "
                f"{gaps['acc_norm']['all']['verdict']} |"
            )
    lines += ["", "## Per task", ""]
    for p in results["pairs"]:
        lines += [f"### {p['source']} → {p['target']}", "",
                  "| config | task | acc | acc_norm | NLL | NLL gap recovered |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for label, per_task in p["configs"].items():
            for task, mt in per_task.items():
                gap = p["methods"].get(label, {}).get("nll", {}).get(task, {}).get("text", "")
                cells = " | ".join(plus_minus(mt[k]) for k in ("acc", "acc_norm", "nll"))
                lines.append(f"| {label} | {task} | {cells} | {gap} |")
        lines.append("")
    return "\n".join(lines) + "\n"
