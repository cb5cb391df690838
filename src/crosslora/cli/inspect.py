"""``crosslora inspect SOURCE TARGET``: what the alignment sees, before a transfer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crosslora.cli import add_threads, add_verbosity
from crosslora.layer_map import LAYER_MAPS

EXAMPLES = ("crosslora inspect HuggingFaceTB/SmolLM2-135M google/gemma-3-270m --png alignment.png",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show how well two base models align (layer map, shared vocabulary, per module)",
        description="Anchor the two models' spaces as the anchored method does and report, per "
        "layer pair and module, how much of the target weight the mapped source weight explains.",
    )
    p.add_argument("source_model", help="base model the adapter was trained on")
    p.add_argument("target_model", help="base model to transfer to")
    p.add_argument("--layer-map", default="depth", choices=LAYER_MAPS,
                   help="which source layer each target layer is compared with")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--png", type=Path, help="write a heatmap of alignment quality")
    p.add_argument("--json", type=Path, help="write the full result as JSON")
    add_threads(p)
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosslora.device import resolve_device
    from crosslora.inspect import check_png_path, format_summary, inspect_pair, plot_heatmap
    from crosslora.io.outfile import check_distinct, check_output_file, input_files, write_atomic

    # the output paths before any work: writable, not a folder, not an input, not each other
    inputs = [*input_files("source model", args.source_model),
              *input_files("target model", args.target_model)]  # fmt: skip
    for option, path in (("--json", args.json), ("--png", args.png)):
        if path is not None:
            check_output_file(path, option, inputs)
    check_distinct([("--json", args.json), ("--png", args.png)])
    fmt = check_png_path(args.png) if args.png is not None else None
    device = resolve_device(args.device)
    result = inspect_pair(args.source_model, args.target_model, args.layer_map, device,
                          progress=not args.quiet)  # fmt: skip
    print(format_summary(result))
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        write_atomic(args.json, lambda tmp: tmp.write_text(text))
    if args.png:
        write_atomic(args.png, lambda tmp: plot_heatmap(result, tmp, fmt))
        print(f"heatmap: {args.png}")
    return 0
