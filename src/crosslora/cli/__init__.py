"""``crosslora`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. User errors (``CrossLoraError``, and bad command lines) print one line,
``crosslora: error: ...``, and exit 2; a traceback is shown only with ``-v``. Ctrl-C and SIGTERM
exit 130 and 143; the output is staged, so nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator

from crosslora.errors import CrossLoraError, one_line
from crosslora.version import __version__

# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("transfer", "inspect", "models", "eval", "bench")

log = logging.getLogger("crosslora")


class UsageError(CrossLoraError):
    """A bad command line (unknown option, invalid value): reported like any user error."""


class Parser(argparse.ArgumentParser):
    """``argparse`` that reports a bad command line in one line instead of usage + exit.

    Subparsers inherit the class, so every subcommand's errors come through here too.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that staged output is cleaned up on the way out."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (where it has one to show), the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help  # no value to show: the help says what happens
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="crosslora",
        description="Transfer LoRA adapters between base LLMs without data or training.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crosslora {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"crosslora.cli.{name}")
        module.register(subparsers)
        sub = subparsers.choices[name]
        sub.formatter_class = HelpFormatter
        sub.epilog = "example:\n  " + "\n  ".join(module.EXAMPLES)
    return parser


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: how many CPU threads torch computes with."""
    parser.add_argument(
        "--threads", type=threads_count, metavar="N",
        help="CPU threads for the computation (default: OMP_NUM_THREADS if set, else the cores "
        "this process may run on)",
    )  # fmt: skip


def threads_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-q`` (warnings only, no progress bars) and ``-v`` (debug logs and tracebacks)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    group.add_argument("-v", "--verbose", action="store_true", help="debug output, tracebacks")


class _BarAwareHandler(logging.StreamHandler):
    """Writes around an active tqdm progress bar, so a warning never shares the bar's line.

    Always to the current ``sys.stderr``: a library caller who ran ``main`` once and then
    redirected or closed the stream it had must not get logging errors later."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        self.stream = sys.stderr

        if not getattr(tqdm, "_instances", None):
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging does: never let a log line break the run
            self.handleError(record)


def configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While running a command, SIGTERM raises ``Terminated`` (main thread only)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def library_warnings_hidden(verbose: bool) -> Iterator[None]:
    """Python warnings come from libraries (transformers' deprecations, PEFT, numpy) and are
    nothing a user can act on: hidden while a command runs, shown with ``-v``. crosslora's own
    warnings are log lines ("warning: ..."), which this leaves alone."""
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    verbose = False
    # OpenMP threads that find their core busy sleep instead of spinning (read when torch loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = build_parser().parse_args(argv)
        quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
        configure_logging(quiet, verbose)
        if hasattr(args, "threads"):
            from crosslora.device import set_threads

            set_threads(args.threads)
        with sigterm_raises(), library_warnings_hidden(verbose):
            return int(args.func(args) or 0)
    except CrossLoraError as err:
        if verbose:
            log.exception("crosslora: error")
        print(f"crosslora: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crosslora: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("crosslora: terminated; nothing was written", file=sys.stderr)
        return 143
    except Exception as err:  # a bug, not a user error: say so in one line unless -v
        if verbose:
            raise
        print(
            f"crosslora: internal error: {type(err).__name__}: {one_line(err)} "
            "(rerun with -v for details)",
            file=sys.stderr,
        )
        return 1
