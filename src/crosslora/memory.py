"""What a transfer will need in memory, against what the machine has: a run that cannot fit is
refused before it loads anything, instead of being killed an hour in.

Most methods stream the base weights one tensor at a time and need little whatever the model's
size (README, "Performance"); a method that loads whole models says how much through
``Method.memory``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import Checkpoint

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class MemoryNeed:
    """Peak bytes a transfer needs: ``host`` in RAM, ``device`` on the accelerator (0 when it
    runs on the CPU, where everything is in ``host``), ``disk`` beside the output (the transfer's
    spool); ``what`` says what they are made of."""

    host: int
    device: int
    what: str
    disk: int = 0

    def describe(self) -> str:
        where = (
            f"{gb(self.host)} of RAM"
            + f", {gb(self.device)} on the device" * bool(self.device)
            + f" and {gb(self.disk)} of disk beside the output" * bool(self.disk)
        )
        return f"about {where} ({self.what})"


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def parameter_bytes(checkpoint: Checkpoint, bytes_per_value: int = 4) -> int:
    """The checkpoint's tensors at ``bytes_per_value`` each (float32 by default); headers only."""
    return bytes_per_value * sum(math.prod(checkpoint.shape(k)) for k in checkpoint.keys())


SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


def stored_bytes(checkpoint: Checkpoint, keys: list[str] | None = None) -> int:
    """The checkpoint's tensors (or ``keys``) as stored (bfloat16 for most); headers only."""
    return sum(SAFETENSORS_BYTES.get(checkpoint.dtype(k), 1) * math.prod(checkpoint.shape(k))
               for k in (checkpoint.keys() if keys is None else keys))  # fmt: skip


def available(device: torch.device) -> tuple[int | None, int | None]:
    """``(RAM, device memory)`` free now in bytes; None where it cannot be told.

    RAM is ``MemAvailable`` plus free swap (Linux); the device's is what CUDA reports free.
    """
    host = None
    try:
        fields = dict(
            line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line
        )
        host = 1024 * sum(int(fields[k].split()[0]) for k in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        pass
    dev = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return host, dev


def check_fits(need: MemoryNeed, device: torch.device, method: str, folder: Path) -> None:
    """Raise a one-line error if ``need`` exceeds what is available now (disk: in ``folder``)."""
    free = shutil.disk_usage(folder).free
    if need.disk > free:
        raise CrossLoraError(
            f"the {method} method needs about {gb(need.disk)} of disk in {folder} for these two "
            f"models ({need.what}), and it has {gb(free)} free"
        )
    host, dev = available(device)
    if host is not None and need.host > host:
        raise CrossLoraError(
            f"the {method} method needs about {gb(need.host)} of RAM for these two models "
            f"({need.what}), and this machine has {gb(host)} available (RAM and swap); "
            "free memory or run it on a larger machine"
        )
    if dev is not None and need.device > dev:
        raise CrossLoraError(
            f"the {method} method needs about {gb(need.device)} on {device} for these two models "
            f"({need.what}), and it has {gb(dev)} free"
        )
