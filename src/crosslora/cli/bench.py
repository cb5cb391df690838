"""``crosslora bench CONFIG``: base, source, oracle and every method's transfer, per pair."""

from __future__ import annotations

import argparse
from pathlib import Path

from crosslora.cli import add_threads, add_verbosity

EXAMPLES = ("crosslora bench bench/demo.json --out runs/demo",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run the transfer benchmark from a JSON config (resumable)",
        description="For each (source, target) pair of the config: evaluate the target's base, "
        "the source adapter on its own model, the oracle (the target's own adapter) and every "
        "method's transfer; report accuracy, NLL and gap recovered with bootstrap intervals. "
        "Writes results.json, results.md and results.png; cached evaluations are reused.",
    )
    p.add_argument("config", type=Path, help="bench config (JSON); see bench/paper_table.json")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    add_threads(p)
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosslora.bench import BenchConfig, run_bench

    config = BenchConfig.from_json(args.config)
    results = run_bench(config, args.out, progress=not args.quiet)
    print((args.out / "results.md").read_text())
    c = results["cache"]
    print(f"results: {args.out}/results.{{json,md,png}} ({c['hits']} cached, {c['misses']} run)")
    return 0
