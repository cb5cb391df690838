r"""PEFT's module-name patterns, matched in bounded time.

PEFT matches an adapter's module names with Python's ``re``: a ``target_modules`` string must
``re.fullmatch`` the name, and a module's rank / alpha come from the first key of
``rank_pattern`` / ``alpha_pattern`` for which ``re.match(rf"(.*\.)?({key})$", name)`` succeeds.
``re`` backtracks: ``(a+)+$`` against forty ``a``s and a ``b`` runs for hours, and nothing can
interrupt it (its C loop sees no signal, a thread cannot be stopped; the ``regex`` package's
``timeout=`` bounds the match but not its compiler, which unrolls ``((a{100}){100}){100}``).

So a match runs in this process only where it is cheap by construction: plain dotted names
(letters, digits, ``_``, ``-``, ``.``, ``\.``: no repetition or alternation, so nothing to
backtrack beyond PEFT's own ``(.*\.)?``), short names, few pairs. Anything else runs, with the
same ``re`` and the same rules, in a child Python process (this file is its program, which is
why it imports only the standard library) that is killed after ``LIMIT_SECONDS``: the result is
PEFT's own, or ``PatternTimeout`` naming the pattern and the module it was matching.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence

LIMIT_SECONDS = 10.0  # all of one adapter's matching, child start included
PLAIN = re.compile(r"(?:[\w-]|\\?\.)*")
_CHEAP_PAIRS, _CHEAP_PATTERN, _CHEAP_NAME = 10_000, 128, 256
_MEMORY = 2 << 30  # the child's address space

# (mode, patterns, names): mode "full" (target_modules) or "suffix" (rank/alpha_pattern keys)
Job = tuple[str, Sequence[str], Sequence[str]]


class PatternTimeout(Exception):
    """Matching did not finish in time: job, pattern (None: not known) and name indices."""

    def __init__(self, job: int, pattern: int | None, name: int) -> None:
        super().__init__(job, pattern, name)
        self.job, self.pattern, self.name = job, pattern, name


class PatternFailure(Exception):
    """The child process failed (out of memory, killed): its last words."""


def wrapped(pattern: str, mode: str) -> str:
    """The regex PEFT actually runs for ``pattern``."""
    return pattern if mode == "full" else rf"(.*\.)?({pattern})$"


def _plain(pattern: str) -> bool:
    return len(pattern) <= _CHEAP_PATTERN and PLAIN.fullmatch(pattern) is not None


def _run(jobs: Sequence[Job], progress=None) -> list[list[int | None]]:
    """Per job, per name: the index of the first pattern that matches it (None: none does)."""
    results = []
    for j, (mode, patterns, names) in enumerate(jobs):
        compiled = [re.compile(wrapped(p, mode)) for p in patterns]
        watch = [not _plain(p) for p in patterns]
        out: list[int | None] = []
        for n, name in enumerate(names):
            if progress:
                progress(f"{j} - {n}")
            hit = None
            for i, rx in enumerate(compiled):
                if progress and watch[i]:
                    progress(f"{j} {i} {n}")
                if rx.fullmatch(name) if mode == "full" else rx.match(name):
                    hit = i
                    break
            out.append(hit)
        results.append(out)
    return results


def _cheap(jobs: Sequence[Job]) -> bool:
    return all(
        not patterns
        or not names
        or (
            len(patterns) * len(names) <= _CHEAP_PAIRS
            and all(map(_plain, patterns))
            and all(len(name) <= _CHEAP_NAME for name in names)
        )
        for _, patterns, names in jobs
    )


def first_matches(jobs: Sequence[Job]) -> list[list[int | None]]:
    """``_run(jobs)``, in this process where that is cheap, else in a child process killed after
    ``LIMIT_SECONDS`` (``PatternTimeout``). Every pattern must compile (``wrapped`` included)."""
    jobs = [(mode, list(patterns), list(names)) for mode, patterns, names in jobs]
    program = os.path.abspath(__file__)
    if _cheap(jobs) or not sys.executable or not os.path.isfile(program):
        return _run(jobs)
    payload = json.dumps(jobs).encode()  # ASCII: any string survives the trip
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", program], input=payload, capture_output=True,
            timeout=LIMIT_SECONDS, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        raise _timeout(err.stdout or b"", jobs) from None
    except OSError:  # no child process can be started here: match in this one
        return _run(jobs)
    lines = done.stdout.decode(errors="replace").splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("= "):
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise PatternFailure(said[-1] if said else f"exit status {done.returncode}")
    return json.loads(lines[-1][2:])


def _timeout(output: bytes, jobs: Sequence[Job]) -> PatternTimeout:
    lines = [line for line in output.decode(errors="replace").splitlines() if line[:1].isdigit()]
    if not lines:  # not even started: blame the first job's first pattern and name
        j = next((i for i, (_, patterns, names) in enumerate(jobs) if patterns and names), 0)
        return PatternTimeout(j, 0, 0)
    j, i, n = lines[-1].split()
    return PatternTimeout(int(j), None if i == "-" else int(i), int(n))


def _child() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _MEMORY if hard == resource.RLIM_INFINITY else min(_MEMORY, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass
    jobs = json.loads(sys.stdin.buffer.read())
    results = _run(jobs, lambda line: os.write(1, f"{line}\n".encode()))  # unbuffered
    sys.stdout.write("= " + json.dumps(results) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _child()
