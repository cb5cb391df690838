"""How fast this machine computes, for the plan's time estimate: float32 matrix products per
second on a device, measured once per process in a few tenths of a second."""

from __future__ import annotations

import time
from functools import cache

import torch

# real work (many shapes, memory-bound steps, Python between them) runs at about this fraction
# of a square product's rate: fitted to two measured matched transfers on a quiet 2-core CPU
# (docs/results.md, "Performance")
EFFICIENCY = 0.7


def seconds_for(flops: float, device: torch.device) -> float:
    """About how long ``flops`` operations of a transfer take on ``device``."""
    return flops / (EFFICIENCY * matmul_flops(device))


@cache
def matmul_flops(device: torch.device) -> float:
    """Float32 FLOP/s of a 512 × 512 product on ``device`` with the current thread count (best of
    a few repeats, so that a busy moment does not make every estimate long)."""
    a = torch.randn(512, 512, device=device)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(8):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 8 * 2 * 512**3 / max(best, 1e-9)


def duration(seconds: float) -> str:
    """``seconds`` for a person: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
