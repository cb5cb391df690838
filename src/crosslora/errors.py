"""The one exception type for problems a user can cause and fix.

The CLI prints a ``CrossLoraError`` as a single line and exits non-zero; anything else is a bug
and is reported as such (with a traceback under ``-v``).
"""

from __future__ import annotations


class CrossLoraError(Exception):
    """A user-facing error: bad input, unsupported model or adapter, unusable output path."""
