"""Which device a run computes on: ``--device auto|cpu|cuda|cuda:N``, checked in one place."""

from __future__ import annotations

import os

import torch

from crosslora.errors import CrossLoraError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None: CUDA where available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
    (N an existing GPU); anything else is one clear error."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise CrossLoraError(
            f"--device {name}: not a device (choose auto, cpu, cuda or cuda:N)"
        ) from err
    if device.type not in ("cpu", "cuda"):
        raise CrossLoraError(f"--device {name}: not supported (choose auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CrossLoraError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CrossLoraError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def default_threads() -> int:
    """``OMP_NUM_THREADS`` where it is set, else the cores this process may run on (its CPU
    affinity, which a container or ``taskset`` narrows; not the machine's core count)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Compute with ``threads`` CPU threads (None: ``default_threads()``); returns the number."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n
