"""Per-item metrics, their means with standard errors, and bootstrap intervals over items.

Per item, from its choices' summed log-likelihoods ``ll``, character lengths and token counts:

- ``acc``: ``argmax(ll) == gold``;
- ``acc_norm``: ``argmax(ll / chars) == gold`` (lm-eval's per-character normalisation);
- ``nll``: ``-ll[gold]``, the summed negative log-likelihood of the gold continuation (nats);
- ``nll_token``: ``nll / n_tokens[gold]``, per token.

A task's value of each is the mean over items, with lm-eval's ``mean_stderr`` (sample standard
deviation, ``ddof=1``, over ``sqrt(n)``). Ties in ``argmax`` go to the first choice, as numpy's.

Comparisons between models are paired: the same items, resampled together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("acc", "acc_norm", "nll", "nll_token")


def item_metrics(
    logliks: Sequence[float], char_lens: Sequence[int], n_tokens: Sequence[int], gold: int
) -> dict[str, float]:
    """The four per-item values for one question."""
    ll = np.asarray(logliks, dtype=np.float64)
    chars = np.asarray(char_lens, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: -inf (NaN for ll 0)
        per_char = np.where(chars > 0, ll / chars, -np.inf)
    return {
        "acc": float(np.argmax(ll) == gold),
        "acc_norm": float(np.argmax(per_char) == gold),
        "nll": float(-ll[gold]),
        "nll_token": float(-ll[gold] / n_tokens[gold]),
    }


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample std (ddof=1) / sqrt(n); NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan
    return float(x.std(ddof=1) / math.sqrt(x.size))


def aggregate(per_item: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {"value": mean, "stderr": se}}`` over items."""
    out = {}
    for name in METRICS:
        values = [row[name] for row in per_item]
        out[name] = {
            "value": float(np.mean(values)) if values else math.nan,
            "stderr": mean_stderr(values),
        }
    return out


@dataclass(frozen=True)
class Interval:
    """A point estimate and a two-sided percentile-bootstrap interval."""

    point: float
    low: float
    high: float
    confidence: float = 0.95

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"point": self.point, "low": self.low, "high": self.high, "level": self.confidence}


def _resample_means(
    columns: np.ndarray, n_resamples: int, seed: int, chunk: int = 512
) -> np.ndarray:
    """Means of ``columns`` ((n_items, k)) over ``n_resamples`` bootstrap resamples of items,
    every column resampled with the same indices: ``(n_resamples, k)``."""
    n = columns.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n_resamples, columns.shape[1]))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = columns[idx].mean(axis=1)
    return out


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    kept = samples[~np.isnan(samples)]
    # Interpolating next to an infinite ratio (a zero denominator) would give NaN.
    method = "linear" if np.isfinite(kept).all() else "nearest"
    low, high = np.quantile(kept, [alpha, 1.0 - alpha], method=method)
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 10_000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
    statistic: Callable[[np.ndarray], float] | None = None,
) -> Interval:
    """Percentile-bootstrap interval of the mean of per-item ``values``.

    For a paired comparison of two models on the same items, pass the per-item differences
    (``a - b``); the items are what is resampled. A custom ``statistic`` (a function of the
    resampled 1-D array) replaces the mean, at a loop's speed.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("values must be a non-empty 1-D sequence")
    if statistic is None:
        samples = _resample_means(x[:, None], n_resamples, seed)[:, 0]
        point = float(x.mean())
    else:
        rng = np.random.default_rng(seed)
        samples = np.array(
            [statistic(x[rng.integers(0, x.size, x.size)]) for _ in range(n_resamples)]
        )
        point = float(statistic(x))
    low, high = _percentiles(samples, confidence)
    return Interval(point, low, high, confidence)


@dataclass(frozen=True)
class GapRecovered:
    """(transferred - base) / (oracle - base), with a bootstrap interval over items.

    ``defined`` is false when the interval of (oracle - base) includes 0: the oracle does not
    beat the base beyond the noise, and no ratio means anything. ``value`` is then the string
    ``"undefined"`` and ``interval`` is ``None``.
    """

    defined: bool
    interval: Interval | None
    oracle_minus_base: Interval
    transferred_minus_base: Interval

    @property
    def value(self) -> float | str:
        return self.interval.point if self.interval is not None else "undefined"

    def as_dict(self) -> dict:
        return {
            "gap_recovered": self.value,
            "interval": self.interval.as_dict() if self.interval else None,
            "oracle_minus_base": self.oracle_minus_base.as_dict(),
            "transferred_minus_base": self.transferred_minus_base.as_dict(),
        }

    def __str__(self) -> str:
        if self.interval is None:
            d = self.oracle_minus_base
            return f"undefined (oracle - base {d.point:+.4f}, 95% CI [{d.low:+.4f}, {d.high:+.4f}])"
        i = self.interval
        return f"{i.point:.3f} (95% CI [{i.low:.3f}, {i.high:.3f}])"


def gap_recovered(
    base: Sequence[float],
    transferred: Sequence[float],
    oracle: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
) -> GapRecovered:
    """Gap recovered from per-item values of one metric on the same items, in the same order.

    Each bootstrap resample draws items once and recomputes all three means from them, so the
    ratio's interval carries the pairing. Works for either direction of metric (for NLL both
    differences are negative when things improve; the ratio is still the fraction recovered).
    """
    cols = np.column_stack([np.asarray(v, dtype=np.float64) for v in (base, transferred, oracle)])
    if cols.shape[0] == 0:
        raise ValueError("no items")
    means = _resample_means(cols, n_resamples, seed)
    d_oracle = means[:, 2] - means[:, 0]
    d_transfer = means[:, 1] - means[:, 0]
    full = cols.mean(axis=0)
    point_oracle, point_transfer = full[2] - full[0], full[1] - full[0]
    oracle_iv = Interval(float(point_oracle), *_percentiles(d_oracle, confidence), confidence)
    transfer_iv = Interval(float(point_transfer), *_percentiles(d_transfer, confidence), confidence)
    if oracle_iv.low <= 0.0 <= oracle_iv.high:
        return GapRecovered(False, None, oracle_iv, transfer_iv)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = d_transfer / d_oracle  # a zero denominator gives +-inf (or NaN, dropped)
    interval = Interval(
        float(point_transfer / point_oracle), *_percentiles(ratios, confidence), confidence
    )
    return GapRecovered(True, interval, oracle_iv, transfer_iv)


def item_values(task_result: dict, metric: str) -> dict[str, float]:
    """``{item id: value}`` of one metric from a task entry of ``evaluate``'s result, for
    pairing two runs by item id."""
    return {rec["id"]: rec[metric] for rec in task_result["items"]}


def plus_minus(metric: dict, digits: int = 3) -> str:
    """``{"value", "stderr"}`` as ``value ± stderr``, for tables."""
    return f"{metric['value']:.{digits}f} ± {metric['stderr']:.{digits}f}"
