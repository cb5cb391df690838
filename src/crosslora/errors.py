"""The one exception type for problems a user can cause and fix, and how its message is made.

The CLI prints a ``CrossLoraError`` as a single line and exits non-zero; anything else is a bug
and is reported as such (with a traceback under ``-v``). ``one_line`` and ``shown`` turn other
libraries' messages and bad values into text that fits on that line.
"""

from __future__ import annotations

import json


class CrossLoraError(Exception):
    """A user-facing error: bad input, unsupported model or adapter, unusable output path."""


def one_line(err: BaseException | str, keep: str = "all") -> str:
    """A message on a single line. ``keep`` says which of its lines matter:

    - ``"all"`` (crosslora's own messages): every line, folded with single spaces;
    - ``"head"`` (a library's load error): the first line, and the second too where the first
      only announces a list ("Error(s) in loading state_dict for PeftModel:");
    - ``"tail"`` (a tool's output, such as pip's, which puts the reason last): the last line that
      starts with ``ERROR``, else the last line.

    An empty message gives the exception's type name (``"(no message)"`` for text).
    """
    lines = [line.strip() for line in str(err).split("\n") if line.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else "(no message)"
    if keep == "head":
        return f"{lines[0]} {lines[1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    if keep == "tail":
        return ([line for line in lines if line.startswith("ERROR")] or lines)[-1]
    return " ".join(lines)


def shown(value: object, width: int = 60) -> str:
    """A bad value as an error message quotes it: JSON, cut to ``width`` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."
