"""``crosslora`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. User errors (``CrossLoraError``) print one line and exit 2; a traceback is
shown only with ``-v``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from crosslora import __version__
from crosslora.errors import CrossLoraError

# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("transfer", "inspect", "models")

log = logging.getLogger("crosslora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosslora",
        description="Transfer LoRA adapters between base LLMs without data or training.",
    )
    parser.add_argument("--version", action="version", version=f"crosslora {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"crosslora.cli.{name}").register(subparsers)
    return parser


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-q`` (warnings only, no progress bars) and ``-v`` (debug logs and tracebacks)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    group.add_argument("-v", "--verbose", action="store_true", help="debug output, tracebacks")


def configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    configure_logging(quiet, verbose)
    try:
        return int(args.func(args) or 0)
    except CrossLoraError as err:
        if verbose:
            log.exception("crosslora: error")
        print(f"crosslora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crosslora: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a user error: say so in one line unless -v
        if verbose:
            raise
        print(
            f"crosslora: internal error: {type(err).__name__}: {err} (rerun with -v for details)",
            file=sys.stderr,
        )
        return 1
