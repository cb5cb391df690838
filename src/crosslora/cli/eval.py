"""``crosslora eval``: zero-shot multiple-choice accuracy and NLL of a model, optionally with
a PEFT adapter, following lm-evaluation-harness's conventions."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from crosslora.cli import add_verbosity
from crosslora.errors import CrossLoraError

log = logging.getLogger("crosslora")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--limit", type=int, metavar="N", help="first N items of each task")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=tuple(_DTYPES),
        help="model dtype (default float32; bfloat16/float16 on CUDA only)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="rows per forward")
    p.add_argument("--output", type=Path, help="write metrics and per-item records as JSON")
    add_verbosity(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crosslora.eval import evaluate, format_table, resolve_device
    from crosslora.eval.tasks import resolve_tasks

    if args.batch_size < 1:
        raise CrossLoraError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise CrossLoraError("--limit must be at least 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    specs = resolve_tasks(tasks, args.split)  # a bad task name fails before any model loads
    device = resolve_device(args.device)
    dtype = _DTYPES[args.dtype]
    if dtype != torch.float32 and device.type != "cuda":
        raise CrossLoraError(f"--dtype {args.dtype} needs a CUDA device; use float32 on CPU")
    if args.output is not None and not args.output.parent.is_dir():
        raise CrossLoraError(f"--output: folder {args.output.parent} does not exist")

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.adapter, device, dtype, quiet=args.quiet)
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
        install_data=True,
    )
    result = {"model": str(args.model), "adapter": args.adapter and str(args.adapter), **result}
    print(format_table(result))
    if args.output is not None:
        _write_json(args.output, result)
        log.info("wrote %s", args.output)
    return 0


def load_model(
    model: str, adapter: str | None, device: torch.device, dtype: torch.dtype, quiet: bool = False
):
    """(model in eval mode on ``device``, tokenizer) from local folders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:  # -q: no weight-loading progress bar either
        hf_logging.disable_progress_bar()

    folder = _model_folder(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as err:
        raise CrossLoraError(f"cannot load model {folder}: {_one_line(err)}") from err
    if adapter is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise CrossLoraError(f"--adapter {adapter}: no adapter_config.json there")
        try:
            lm = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise CrossLoraError(f"cannot load adapter {adapter}: {_one_line(err)}") from err
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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_finite(result), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CrossLoraError(f"cannot write {path}: {err}") from err
