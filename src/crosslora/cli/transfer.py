"""``crosslora transfer``: a PEFT LoRA adapter in, a PEFT adapter for another base model out."""

from __future__ import annotations

import argparse
from pathlib import Path

from crosslora.cli import add_threads, add_verbosity
from crosslora.errors import CrossLoraError
from crosslora.layer_map import LAYER_MAPS
from crosslora.linalg import DEFAULT_SVD, DEFAULT_TRUNCATION_RANK, SVD_MODES
from crosslora.methods import DEFAULT_METHOD, METHODS
from crosslora.pipeline import TransferOptions, batch_outputs, plan_transfers, run_transfers
from crosslora.refine.params import OBJECTIVES, STARTS, RefineParams
from crosslora.refine.prompts import read_prompts


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


EXAMPLES = (
    "crosslora transfer --adapter my-adapter --source-model HuggingFaceTB/SmolLM2-135M "
    "--target-model google/gemma-3-270m --out-path out/my-adapter-gemma",
    "crosslora transfer --adapter adapters/ --source-model S --target-model T --out-path out/ "
    "--dry-run   # several adapters: the plan only",
    "crosslora transfer --adapter adapters/ --source-model S --target-model T --out-path out/ "
    "--ray local   # one Ray task per adapter (--ray HOST:PORT for a cluster)",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transfer",
        help="transfer a LoRA adapter to another base model",
        description="Transfer a PEFT LoRA adapter trained on SOURCE to TARGET, without data or "
        "training. Writes a standard PEFT adapter folder with a transfer report.",
    )
    p.add_argument(
        "--adapter", required=True, action="append",
        help="PEFT adapter folder (or hub id); repeat it, or name a folder whose subfolders are "
        "adapters, to transfer several in one pass (then --out-path is their parent folder)",
    )  # fmt: skip
    p.add_argument("--source-model", required=True, help="base model the adapter was trained on")
    p.add_argument("--target-model", required=True, help="base model to transfer to")
    p.add_argument(
        "--out-path", required=True, type=Path,
        help="output adapter folder; with several adapters, the folder that receives "
        "<out-path>/<adapter folder name>/ for each",
    )  # fmt: skip
    p.add_argument(
        "--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
        help="how to carry the adapter over (docs/methods.md; the plan says what each recovered "
        "on the benchmark)",
    )  # fmt: skip
    p.add_argument(
        "--layer-map", choices=LAYER_MAPS,
        help="index (layer i to i, the paper's) or depth (relative depth); default: the method's",
    )  # fmt: skip
    p.add_argument(
        "--truncation-rank", type=truncation_rank, default=DEFAULT_TRUNCATION_RANK, metavar="K",
        help="SVD components kept (default %(default)s, as the paper; 'full' for complete bases)",
    )  # fmt: skip
    p.add_argument(
        "--svd", choices=SVD_MODES, default=DEFAULT_SVD,
        help="fast: randomized block Krylov SVD (within 1e-3 of exact at 7B shapes, "
        "docs/results.md); exact: the full SVD, as the paper",
    )  # fmt: skip
    p.add_argument(
        "--cache-dir", type=Path, metavar="DIR",
        help="cache shared by later transfers: SVD bases in DIR, matched's pair preparations in "
        "DIR/pairs (default: $CROSSLORA_HOME/bases and $CROSSLORA_HOME/pairs, else under "
        "~/.cache/crosslora)",
    )  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the caches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"),
        help="dtype of the written tensors (default: the source adapter's)",
    )  # fmt: skip
    p.add_argument(
        "--draws", type=int, default=1, metavar="N",
        help="matched: run the transfer N times with independent probe text and write the mean "
        "update, cut back to the adapter's rank (N times the time)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an output folder that crosslora wrote (unchanged since); any other "
        "non-empty folder is refused",
    )  # fmt: skip
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="accept adapter_model.bin (loaded with torch.load(weights_only=True))",
    )  # fmt: skip
    p.add_argument(
        "--base-model-name-or-path", metavar="NAME",
        help="the base model the written adapter names (default: the target's hub id where "
        "known, else its folder's name)",
    )  # fmt: skip
    p.add_argument(
        "--ray", metavar="ADDRESS",
        help="spread the adapters over the Ray cluster at ADDRESS (host:port of its head, or "
        "auto), one task each asking for --threads CPUs or one GPU; 'local' starts a cluster on "
        "this machine for the run. Inputs and outputs must be on a filesystem every node sees "
        "(needs crosslora[ray])",
    )  # fmt: skip
    g = p.add_argument_group("refine (opt-in training after the transfer)")
    g.add_argument(
        "--refine", action="store_true",
        help="after the transfer, distil the source adapter into the target on text the source "
        "writes with it (a short training run; docs/methods.md, \"Refine\")",
    )  # fmt: skip
    g.add_argument(
        "--prompts", type=Path, metavar="FILE",
        help="a few unlabeled task inputs that seed the teacher's text, one per line or JSON "
        "lines (default: none, data-free)",
    )  # fmt: skip
    g.add_argument("--refine-steps", type=int, metavar="N",
                   help=f"training steps of {RefineParams.batch} texts (default: "
                   f"{RefineParams.epochs:g} passes over the texts kept)")  # fmt: skip
    g.add_argument(
        "--refine-objective", choices=OBJECTIVES, default=RefineParams.objective,
        help="shift: the target's own distribution at the aligned positions, moved as the "
        "adapter moves the source's; nll: the teacher's selected tokens; kl: its distribution "
        "over the shared vocabulary there; auto: nll where the source base reads the --prompts "
        "at a lower NLL per character than the target base, else shift (default %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--refine-from", choices=STARTS, default=RefineParams.start,
        help="the student's start: the training-free transfer, or an untrained LoRA of the same "
        "rank (default %(default)s)",
    )  # fmt: skip
    g.add_argument("--refine-seed", type=int, default=RefineParams.seed, metavar="N",
                   help="the refine's seed: one seed, one result on a machine (default "
                   "%(default)s)")  # fmt: skip
    add_threads(p)
    add_verbosity(p)
    p.set_defaults(func=run)


def refine_params(args: argparse.Namespace) -> RefineParams | None:
    """The refine's parameters from the command line; refine flags without --refine are refused."""
    defaults = {"prompts": None, "refine_steps": None, "refine_objective": RefineParams.objective,
                "refine_from": RefineParams.start, "refine_seed": RefineParams.seed}
    given = ["--" + d.replace("_", "-") for d, v in defaults.items() if getattr(args, d) != v]
    if not args.refine:
        if given:
            raise CrossLoraError(f"{given[0]} needs --refine")
        return None
    prompts = read_prompts(args.prompts) if args.prompts is not None else ()
    return RefineParams(steps=args.refine_steps, objective=args.refine_objective,
                        start=args.refine_from, seed=args.refine_seed, prompts=prompts)  # fmt: skip


def expand_adapters(specs: list[str]) -> list[str]:
    """Each ``--adapter``: an adapter, or a folder whose subfolders are adapters (sorted)."""
    out: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and not (path / "adapter_config.json").exists():
            subs = sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file())
            if subs:
                out.extend(str(p) for p in subs)
                continue
        out.append(spec)
    return out


def run(args: argparse.Namespace) -> int:
    options = TransferOptions(
        method=args.method, layer_map=args.layer_map, truncation_rank=args.truncation_rank,
        device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle, svd=args.svd,
        cache=not args.no_cache, cache_dir=str(args.cache_dir) if args.cache_dir else None,
        draws=args.draws, base_model_name_or_path=args.base_model_name_or_path,
        refine=refine_params(args),
    )  # fmt: skip
    adapters = expand_adapters(args.adapter)
    several = len(adapters) > 1 or adapters != args.adapter
    outs = batch_outputs(adapters, args.out_path) if several else [args.out_path]
    if not args.dry_run:
        if args.ray:  # Ray is an optional extra, imported only here
            from crosslora.cluster import run_on_cluster

            run_on_cluster(adapters, args.source_model, args.target_model, outs, options,
                           args.overwrite, not args.quiet, args.ray, args.threads)  # fmt: skip
        else:
            run_transfers(adapters, args.source_model, args.target_model, outs, options,
                          args.overwrite, not args.quiet)  # fmt: skip
        for out in outs:  # on stdout, -q or not: where the output went
            print(out)
        return 0
    batch, plans = plan_transfers(adapters, args.source_model, args.target_model, options)
    for inputs, plan, out in zip(batch, plans, outs):
        if several:
            print(f"adapter {inputs.adapter.path} -> {out}")
        print(plan.describe())
        if options.draws > 1:
            print(f"draws: {options.draws} (the transfer runs {options.draws} times with "
                  "independent probe text; the mean update is written, at the adapter's "
                  "rank)")  # fmt: skip
    return 0
