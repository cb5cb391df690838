"""``crosslora transfer``: a PEFT LoRA adapter in, a PEFT adapter for another base model out."""

from __future__ import annotations

import argparse
from pathlib import Path

from crosslora.cli import add_verbosity
from crosslora.io.output import check_output_path
from crosslora.layer_map import LAYER_MAPS
from crosslora.methods import DEFAULT_METHOD, METHODS
from crosslora.plan import plan_transfer, resolve
from crosslora.transfer import TransferOptions, resolve_device, run_plan


def truncation_rank(text: str) -> int | None:
    if text == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'full', got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'full', got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transfer",
        help="transfer a LoRA adapter to another base model",
        description="Transfer a PEFT LoRA adapter trained on SOURCE to TARGET, without data or "
        "training. Writes a standard PEFT adapter folder with a transfer report.",
    )
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (or hub id)")
    p.add_argument("--source-model", required=True, help="base model the adapter was trained on")
    p.add_argument("--target-model", required=True, help="base model to transfer to")
    p.add_argument("--out-path", required=True, type=Path, help="output adapter folder")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS))
    p.add_argument(
        "--layer-map", choices=LAYER_MAPS,
        help="index (layer i to i, the paper's) or depth (relative depth); default: the method's",
    )  # fmt: skip
    p.add_argument(
        "--truncation-rank", type=truncation_rank, default=320, metavar="K",
        help="SVD components kept (default 320, as the paper; 'full' for complete bases)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"),
        help="dtype of the written tensors (default: the source adapter's)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="accept adapter_model.bin (loaded with torch.load(weights_only=True))",
    )  # fmt: skip
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = TransferOptions(
        method=args.method, layer_map=args.layer_map, truncation_rank=args.truncation_rank,
        device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if not args.dry_run:
        check_output_path(args.out_path, args.overwrite)
    device = resolve_device(options.device)
    inputs = resolve(args.adapter, args.source_model, args.target_model, options.allow_pickle)
    plan = plan_transfer(inputs, options.method, options.layer_map, options.truncation_rank)
    if args.dry_run:
        print(plan.describe())
        return 0
    run_plan(inputs, plan, options, device, args.out_path, args.overwrite, not args.quiet)
    return 0
