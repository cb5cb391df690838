"""``crosslora inspect SOURCE TARGET``: what a method sees between two models, before a transfer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crosslora.cli import add_threads, add_verbosity
from crosslora.layer_map import LAYER_MAPS
from crosslora.methods import DEFAULT_METHOD, METHODS

EXAMPLES = ("crosslora inspect HuggingFaceTB/SmolLM2-135M google/gemma-3-270m --png maps.png",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what a method sees between two base models, and the odds it gives",
        description="matched (the default): read the two models on matched's probe text (kept "
        "in the pair cache for a later transfer) and report, per layer pair, how well each of its "
        "maps predicts the other model on held-out probe text, and what pairs like this one "
        "recovered on the benchmark. anchored: anchor the two models' spaces as the anchored "
        "method does and report how much of each target weight the mapped source weight explains. "
        "Every method: its layer map and what it recovered on the benchmark.",
    )
    p.add_argument("source_model", help="base model the adapter was trained on")
    p.add_argument("target_model", help="base model to transfer to")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                   help="the method whose view to show (measured for matched and anchored; for "
                   "the others, what the benchmark measured)")  # fmt: skip
    p.add_argument("--layer-map", choices=LAYER_MAPS,
                   help="which source layer each target layer is compared with (default: the "
                   "method's own)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path,
                   help="where matched's pair cache lives (default: $CROSSLORA_HOME, else "
                   "~/.cache/crosslora)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--png", type=Path, help="write a heatmap of the qualities")
    p.add_argument("--json", type=Path, help="write the full result as JSON")
    add_threads(p)
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosslora.device import resolve_device
    from crosslora.errors import CrossLoraError
    from crosslora.inspect import VIEWS, check_png_path, format_summary, inspect_pair, plot_heatmap
    from crosslora.io.outfile import check_distinct, check_output_file, input_files, write_atomic

    # the output paths before any work: writable, not a folder, not an input, not each other
    inputs = [*input_files("source model", args.source_model),
              *input_files("target model", args.target_model)]  # fmt: skip
    for option, path in (("--json", args.json), ("--png", args.png)):
        if path is not None:
            check_output_file(path, option, inputs)
    check_distinct([("--json", args.json), ("--png", args.png)])
    if args.png is not None and args.method not in VIEWS:
        raise CrossLoraError(f"--png: inspect measures nothing to plot for {args.method} "
                             f"(only for {' and '.join(VIEWS)})")  # fmt: skip
    fmt = check_png_path(args.png) if args.png is not None else None
    device = resolve_device(args.device)
    pair_dir = args.cache_dir / "pairs" if args.cache_dir else None
    result = inspect_pair(args.source_model, args.target_model, args.method, args.layer_map,
                          device, pair_dir, progress=not args.quiet)  # fmt: skip
    print(format_summary(result))
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        write_atomic(args.json, lambda tmp: tmp.write_text(text))
    if args.png:
        write_atomic(args.png, lambda tmp: plot_heatmap(result, tmp, fmt))
        print(f"heatmap: {args.png}")
    return 0
