"""Where crosslora keeps what it caches (pulled models, SVD bases): one root for all of them.

``$CROSSLORA_HOME`` if that variable is set, else ``~/.cache/crosslora``; each cache is a folder
under it (``models``, ``bases``). Nothing here creates a folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def crosslora_home() -> Path:
    """``$CROSSLORA_HOME`` (``~`` expanded) if set and not empty, else ``~/.cache/crosslora``."""
    home = os.environ.get("CROSSLORA_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "crosslora"
