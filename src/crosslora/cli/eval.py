"""``crosslora eval``: zero-shot multiple-choice accuracy and NLL of a model, optionally with
a PEFT adapter, following lm-evaluation-harness's conventions."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from crosslora.cli import add_threads, add_verbosity
from crosslora.errors import CrossLoraError, one_line

log = logging.getLogger("crosslora")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


EXAMPLES = (
    "crosslora eval --model google/gemma-3-270m --adapter out/my-adapter-gemma "
    "--tasks arc_easy,arc_challenge --limit 200 --output results.json",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    from crosslora.eval.tasks import TASKS

    p = subparsers.add_parser(
        "eval",
        help="zero-shot multiple-choice evaluation (acc, acc_norm, NLL)",
        description="Score a model (and optionally a PEFT adapter on it) on zero-shot "
        "multiple-choice tasks the way lm-evaluation-harness does: each choice's summed "
        "log-likelihood as a continuation. Prints acc, acc_norm and the gold answer's NLL with "
        "standard errors; --output also keeps every item's per-choice log-likelihoods.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--adapter", help="PEFT adapter folder to load on the model")
    p.add_argument(
        "--tasks",
        help=f"comma-separated: {', '.join(TASKS)}, or task .json files "
        "(default: every task with the split)",
    )
    p.add_argument("--split", default="validation", choices=("validation", "test"),
                   help="which split of the built-in tasks")  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N", help="first N items of each task")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=tuple(_DTYPES),
        help="model dtype (bfloat16/float16 on CUDA only)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="rows per forward")
    p.add_argument("--output", type=Path, help="write metrics and per-item records as JSON")
    p.add_argument(
        "--allow-pickle", action="store_true",
        help="accept an adapter_model.bin adapter (loaded with torch.load(weights_only=True))",
    )  # fmt: skip
    add_threads(p)
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosslora.device import resolve_device
    from crosslora.eval import evaluate, format_table, load_tasks
    from crosslora.eval.data import require_data
    from crosslora.eval.tasks import resolve_tasks

    if args.batch_size < 1:
        raise CrossLoraError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise CrossLoraError("--limit must be at least 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.tasks is not None and not tasks:
        raise CrossLoraError(f"--tasks {args.tasks!r} names no task")
    specs = resolve_tasks(tasks, args.split)  # a bad task name fails before any model loads
    device = resolve_device(args.device)
    dtype = _DTYPES[args.dtype]
    if dtype != torch.float32 and device.type != "cuda":
        raise CrossLoraError(f"--dtype {args.dtype} needs a CUDA device; use float32 on CPU")
    folder = _model_folder(args.model)
    if args.output is not None:
        from crosslora.io.outfile import check_output_file, input_files

        inputs = [*input_files("model", folder), *input_files("adapter", args.adapter)]
        for spec in specs:
            inputs += [(f"data file of task {spec.name}", f) for f in spec.files.values()]
        inputs += [("task file", t) for t in tasks or () if t.endswith(".json")]
        check_output_file(args.output, "--output", inputs)
    require_data(specs, args.split)  # installed by `crosslora models pull-data`, never here
    if args.adapter is not None:
        _check_adapter_fits(Path(args.adapter), folder)
    # the data, and how the model's tokenizer splits it, before the model loads
    prepared = load_tasks(specs, args.split, args.limit, _tokenizer(folder))

    start = time.perf_counter()
    model, tokenizer = load_model(
        args.model, args.adapter, device, dtype, quiet=args.quiet, allow_pickle=args.allow_pickle
    )
    log.info("loaded %s%s on %s in %.1f s", args.model,
             f" + {args.adapter}" if args.adapter else "", device,
             time.perf_counter() - start)  # fmt: skip
    result = evaluate(
        model,
        tokenizer,
        specs,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        device=None,  # already placed
        progress=not args.quiet,
        prepared=prepared,
    )
    result = {"model": str(args.model), "adapter": args.adapter and str(args.adapter), **result}
    print(format_table(result))
    if args.output is not None:
        _write_json(args.output, result)
        log.info("wrote %s", args.output)
    return 0


def load_model(
    model: str,
    adapter: str | None,
    device: torch.device,
    dtype: torch.dtype,
    quiet: bool = False,
    allow_pickle: bool = False,
):
    """(model in eval mode on ``device``, tokenizer) from local folders; never code from them
    (``trust_remote_code=False``), and a pickle adapter only with ``allow_pickle``, checked with
    ``torch.load(weights_only=True)`` before the model loads (as ``transfer`` reads it)."""
    from transformers.utils import logging as hf_logging

    from crosslora.io.peft_adapter import check_adapter_weights
    from crosslora.io.pretrained import load_causal_lm, load_peft_adapter, load_tokenizer

    if quiet:  # -q: no weight-loading progress bar either
        hf_logging.disable_progress_bar()

    folder = _model_folder(model)
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise CrossLoraError(f"--adapter {adapter}: no adapter_config.json there")
        check_adapter_weights(adapter_dir, allow_pickle)
    try:
        tokenizer = load_tokenizer(folder, "--model")
        lm = load_causal_lm(folder, "--model", dtype=dtype)
    except (OSError, ValueError) as err:
        raise CrossLoraError(f"cannot load model {folder}: {one_line(err, 'head')}") from err
    if adapter is not None:
        try:
            lm = load_peft_adapter(lm, adapter_dir, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise CrossLoraError(f"cannot load adapter {adapter}: {one_line(err, 'head')}") from err
    return lm.to(device).eval(), tokenizer


def _model_folder(model: str) -> Path:
    folder = Path(model)
    if (folder / "config.json").is_file():
        return folder
    try:  # a name from `crosslora models list`, if that model was pulled
        from crosslora.zoo import models as zoo

        if model in zoo.REGISTRY:
            return Path(zoo.model_path(model, must_exist=True))
    except ImportError:
        pass
    raise CrossLoraError(f"--model {model}: not a model folder (no config.json)")


def _tokenizer(folder: Path):
    from crosslora.io.pretrained import load_tokenizer

    try:
        return load_tokenizer(folder, "--model")
    except (OSError, ValueError) as err:
        raise CrossLoraError(f"cannot load model {folder}: {one_line(err, 'head')}") from err


def _check_adapter_fits(adapter: Path, folder: Path) -> None:
    """From the two files' headers alone, before either loads: every LoRA module of the adapter
    names a 2-D weight of the model whose shape its ΔW (B @ A) has, in either orientation (GPT-2's
    Conv1D stores (in, out)). What cannot be read here is left to PEFT's own load."""
    from crosslora.io.checkpoint import Checkpoint
    from crosslora.io.peft_adapter import LORA_KEY
    from crosslora.io.safetensors_file import TensorFile

    if not adapter.is_dir():
        raise CrossLoraError(f"--adapter {adapter}: no such folder")
    if not (adapter / "adapter_config.json").is_file():
        raise CrossLoraError(f"--adapter {adapter}: no adapter_config.json there")
    weights = adapter / "adapter_model.safetensors"
    model_files = ("model.safetensors", "model.safetensors.index.json")
    if not weights.is_file() or not any((folder / n).exists() for n in model_files):
        return
    try:
        factors, model = TensorFile(weights), Checkpoint(folder, "--model")
    except CrossLoraError:
        return  # the loads below say what is wrong, in their own words
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in factors.keys():
        m = LORA_KEY.match(key)
        if m is not None:
            found.setdefault(m["module"], {})[m["which"]] = factors.shape(key)
    for module, pair in sorted(found.items()):
        name = model.find(module)
        if name is None or set(pair) != {"A", "B"}:
            continue
        a, b, w = pair["A"], pair["B"], model.shape(name)
        if len(a) != 2 or len(b) != 2 or len(w) != 2:
            continue
        if (b[0], a[1]) != w and (a[1], b[0]) != w:
            raise CrossLoraError(
                f"adapter {adapter} does not fit model {folder}: {module} has ΔW shape "
                f"({b[0]}, {a[1]}), the model's weight is {w}"
            )


def _finite(value):
    """JSON has no NaN: a standard error of one item becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, result: dict) -> None:
    from crosslora.io.outfile import write_atomic

    text = json.dumps(_finite(result), indent=1) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))
