"""The transfer pipeline end to end: resolve, plan, execute per module, write."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from crosslora import __version__
from crosslora.errors import CrossLoraError
from crosslora.execute import assemble, execute
from crosslora.io.output import check_output_path, staged_folder
from crosslora.io.peft_adapter import target_modules_for, write_adapter
from crosslora.methods import DEFAULT_METHOD
from crosslora.plan import Inputs, TransferPlan, plan_transfer, resolve
from crosslora.report import build_report, model_card

log = logging.getLogger("crosslora")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TransferOptions:
    method: str = DEFAULT_METHOD
    layer_map: str | None = None  # None: the method's default
    truncation_rank: int | None = 320  # None: full
    device: str = "auto"
    dtype: str | None = None  # None: the source adapter's dtype
    allow_pickle: bool = False


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N an existing GPU), else one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise CrossLoraError(
            f"--device {name}: not a device (choose auto, cpu, cuda or cuda:N)"
        ) from err
    if device.type not in ("cpu", "cuda"):
        raise CrossLoraError(f"--device {name}: not supported (choose auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CrossLoraError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CrossLoraError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def transfer(
    adapter: str,
    source_model: str,
    target_model: str,
    out_path: str | Path,
    options: TransferOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Transfer ``adapter`` from ``source_model`` to ``target_model``; write a PEFT adapter.

    Returns the transfer report (also written as ``transfer_report.json``).
    """
    options = options or TransferOptions()
    out = Path(out_path)
    check_output_path(out, overwrite)
    device = resolve_device(options.device)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise CrossLoraError(f"--dtype {options.dtype}: choose from {', '.join(DTYPES)}")
    inputs = resolve(adapter, source_model, target_model, options.allow_pickle)
    plan = plan_transfer(inputs, options.method, options.layer_map, options.truncation_rank)
    return run_plan(inputs, plan, options, device, out, overwrite, progress)


def run_plan(
    inputs: Inputs,
    plan: TransferPlan,
    options: TransferOptions,
    device: torch.device,
    out: Path,
    overwrite: bool,
    progress: bool,
) -> dict:
    start = time.perf_counter()
    results = execute(inputs, plan, device, progress)
    modules = assemble(results)
    if not modules:
        first = next((r for r in results if r.skipped), None)
        why = f" (first: {first.task.src.label}: {first.skipped})" if first else ""
        raise CrossLoraError(f"every module was skipped{why}; nothing written")
    seconds = time.perf_counter() - start
    settings = {**asdict(options), "device": str(device)}
    report = build_report(inputs, plan, results, settings, seconds)
    tgt = inputs.tgt
    suffix_of = {
        t.tgt.slot.module: t.tgt.slot.module.split(f".{t.tgt.layer}.", 1)[1] for t in plan.tasks
    }
    name_of = {m: _short_name(s, list(tgt.family.modules)) for m, s in suffix_of.items()}
    layer_of = {r.task.tgt.slot.module: r.task.tgt.layer for r in results}
    selection = target_modules_for(list(modules), layer_of, name_of, tgt.num_layers)
    dtype = DTYPES[options.dtype] if options.dtype else inputs.adapter.dtype
    src_cfg = inputs.adapter.config
    metadata = {
        "crosslora_version": __version__,
        "crosslora_method": plan.method,
        "crosslora_source_model": inputs.src_name,
        "crosslora_target_model": inputs.tgt_name,
        "crosslora_source_adapter": str(inputs.adapter.path),
    }
    with staged_folder(out, overwrite) as tmp:
        write_adapter(
            tmp, modules,
            base_model=inputs.tgt_name,
            r=inputs.adapter.r,
            lora_alpha=inputs.adapter.lora_alpha,
            use_rslora=inputs.adapter.use_rslora,
            selection=selection,
            layers_pattern=tgt.family.layers.split(".")[-1],
            fan_in_fan_out=tgt.family.conv1d,
            dtype=dtype,
            metadata=metadata,
            extra={"task_type": src_cfg.get("task_type") or "CAUSAL_LM",
                   "lora_dropout": float(src_cfg.get("lora_dropout") or 0.0)},
        )  # fmt: skip
        (tmp / "transfer_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report))
    s = report["summary"]
    log.info(
        "wrote %s: %d/%d modules transferred in %.1fs (%s)",
        out, s["transferred"], s["planned"], s["seconds"], plan.method,
    )  # fmt: skip
    return report


def _short_name(suffix: str, family_suffixes: list[str]) -> str:
    """The module's leaf (``q_proj``), or its whole suffix if another module shares that leaf."""
    leaf = suffix.rsplit(".", 1)[-1]
    clash = sum(1 for s in family_suffixes if s.rsplit(".", 1)[-1] == leaf) > 1
    return suffix if clash else leaf
