"""What a pair's ``inspect`` figures have meant on the benchmark: the six real pairs' mean
held-out map qualities (``crosslora inspect`` on each) beside what ``matched`` recovered on them
(one transfer's expectation: the mean of three probe draws, docs/results.md, "The table").

A pair is placed among the benchmark's by the one figure that tracks recovery there
(``STATISTIC``; docs/results.md, "What inspect sees"), and told the recovery of its nearest
neighbours. Six pairs are few: the statement is a guide, not a forecast, and says so.
"""

from __future__ import annotations

from typing import NamedTuple

from crosslora.inspect.matched import MAPS


class Pair(NamedTuple):
    name: str
    means: dict[str, float]  # inspect's mean held-out qualities over the layer pairs
    recovered: float  # NLL gap recovered by matched, mean of three draws


STATISTIC = "stream"
TWIN = 0.95  # function-preserving twins score 0.98-1.0 on every map (tests/test_inspect.py)
TRACKS = 0.5  # the rank correlation below which the figure is not said to rank pairs
# pair, recovered, then the mean qualities in MAPS's order: experiments/inspect_benchmark.py
# prints these rows (docs/results.md, "What inspect sees")
ROWS = [
    ("S->G", 0.282, 0.5056, 0.0401, 0.273, 0.0246, 0.0853, 0.3302),
    ("S->Q", 0.435, 0.4781, 0.0579, 0.2366, 0.0231, 0.0011, 0.2937),
    ("G->S", 0.265, 0.441, 0.0899, 0.3511, 0.1107, 0.0176, 0.333),
    ("G->Q", 0.164, 0.3628, 0.0665, 0.2745, 0.1152, 0.0, 0.2107),
    ("Q->S", 0.366, 0.2174, 0.0818, 0.1539, 0.0024, 0.0289, 0.2108),
    ("Q->G", 0.166, 0.1621, 0.0405, 0.1074, 0.0, 0.0767, 0.2285),
]  # fmt: skip
BENCHMARK = tuple(Pair(name, dict(zip(MAPS, q)), r) for name, r, *q in ROWS)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected)."""

    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0] * len(v)
        for r, i in enumerate(order):
            out[i] = r
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def odds(means: dict[str, float], benchmark: tuple[Pair, ...] = BENCHMARK) -> dict:
    """Where a pair with mean qualities ``means`` stands among the benchmark's pairs, and what
    they recovered; ``says`` is the sentence inspect prints. "Good" and "poor" are said only where
    the benchmark's pairs rank by the figure (rank correlation at least ``TRACKS``)."""
    value = means.get(STATISTIC)
    if not benchmark or value is None:
        return {"statistic": STATISTIC, "value": value,
                "says": "odds: no benchmark figures to compare with"}  # fmt: skip
    xs = [p.means[STATISTIC] for p in benchmark]
    ys = [p.recovered for p in benchmark]
    rho = spearman(xs, ys)
    near = sorted(benchmark, key=lambda p: abs(p.means[STATISTIC] - value))[:2]
    known = (f"on the benchmark's {len(benchmark)} pairs it ranged {min(xs):.3f}-{max(xs):.3f} "
             f"and matched recovered {min(ys):.3f}-{max(ys):.3f} of a target-trained adapter's "
             f"effect (rank correlation {rho:+.2f})")  # fmt: skip
    if value >= TWIN:
        where = ("as function-preserving twins score: the models are one up to coordinates, "
                 "where matched's maps are exact; expect nearly all of the adapter's effect")
    elif rho < TRACKS and not min(xs) <= value <= max(xs):
        where = (f"outside the benchmark's range, which knows no pair like it: {known}, so the "
                 f"figure does not rank pairs there")  # fmt: skip
    elif rho < TRACKS:
        where = (f"within the benchmark's range: {known}, so the figure does not rank pairs "
                 f"there; expect about what they recovered")  # fmt: skip
    elif value < min(xs):
        where = f"below every benchmark pair, poor odds: {known}"
    elif value > max(xs):
        where = f"above every benchmark pair, good odds: {known}"
    else:
        upper = sum(1 for x in xs if x <= value) > len(xs) / 2
        where = f"in the benchmark's {'upper half, good' if upper else 'lower half, poorer'} " \
                f"odds: {known}"
    if value >= TWIN:
        near = []
        says = f"odds: mean {STATISTIC} quality {value:.3f}, {where}."
    else:
        says = (f"odds: mean {STATISTIC} quality {value:.3f}, {where}. Nearest: " + ", ".join(
            f"{p.name} ({p.means[STATISTIC]:.3f}, recovered {p.recovered:.3f})" for p in near)
            + f". {len(benchmark)} pairs: a guide, not a forecast.")  # fmt: skip
    return {"statistic": STATISTIC, "value": value, "rank_correlation": round(rho, 3),
            "nearest": [p.name for p in near], "says": says}  # fmt: skip
