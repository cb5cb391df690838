"""How fast this machine computes, for the plan's time estimate: float32 matrix products and
float64 factorisations per second on a device, each measured once per process in a few tenths of
a second."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import torch

# real work (many shapes, memory-bound steps, Python between them) runs at about this fraction
# of a square product's rate: fitted to two measured matched transfers on a quiet 2-core CPU
# (docs/results.md, "Performance")
EFFICIENCY = 0.7


class Work(NamedTuple):
    """A computation's size for the time estimate, in floating-point operations: ``products``
    (float32 matrix products and the like) and ``float64`` (float64 factorisations: Cholesky,
    SVD), which run several times slower on most devices (about 5× on a CPU)."""

    products: float = 0.0
    float64: float = 0.0


def seconds_for(work: Work, device: torch.device) -> float:
    """About how long ``work`` takes on ``device``."""
    out = work.products / (EFFICIENCY * matmul_flops(device))
    if work.float64:
        out += work.float64 / (EFFICIENCY * factorisation_flops(device))
    return out


@cache
def matmul_flops(device: torch.device) -> float:
    """Float32 FLOP/s of a 512 × 512 product on ``device`` with the current thread count (best of
    a few repeats, so that a busy moment does not make every estimate long)."""
    a = torch.randn(512, 512, device=device)
    return 8 * 2 * 512**3 / _best(lambda: [a @ a for _ in range(8)], device)


@cache
def factorisation_flops(device: torch.device) -> float:
    """Float64 FLOP/s (``n³ / 3``) of a 1024 × 1024 Cholesky factorisation on ``device`` (best
    of a few repeats)."""
    n = 1024
    x = torch.randn(n, n, dtype=torch.float64, device=device)
    spd = x @ x.mT + n * torch.eye(n, dtype=torch.float64, device=device)
    return n**3 / 3 / _best(lambda: torch.linalg.cholesky_ex(spd), device)


def _best(run: Callable[[], object], device: torch.device) -> float:
    """The shortest of five timed runs of ``run``, in seconds."""
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def duration(seconds: float) -> str:
    """``seconds`` for a person: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
