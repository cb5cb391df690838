"""How a pull reports what it does: step lines and byte bars on stderr, or debug logs under -q."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("crosslora.zoo")


class Progress:
    """Step lines (and byte bars) on stderr when enabled; debug log lines otherwise."""

    def __init__(self, enabled: bool, name: str) -> None:
        self.enabled = enabled
        self.name = name

    def step(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)
        else:
            log.debug("[%s] %s", self.name, message)

    def bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=f"[{self.name}] {desc}",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=not self.enabled,
            leave=False,
        )
