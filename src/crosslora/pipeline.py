"""The transfer pipeline end to end: claim the outputs, resolve, plan, execute per module, write."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from crosslora.basis_cache import BasisCache, default_cache_dir
from crosslora.core import Inputs, ModuleResult
from crosslora.device import resolve_device
from crosslora.draws import check_draws, run_draws
from crosslora.errors import CrossLoraError
from crosslora.execute import (
    CACHE_MIN_ELEMENTS,
    BasisSettings,
    adapted_modules,
    assemble,
    prepare_modules,
)
from crosslora.heap import return_large_frees
from crosslora.io.output import OutputClaim, check_separate, claim_outputs, output_filesystem
from crosslora.io.peft_adapter import target_modules_for, write_adapter
from crosslora.io.spool import Spool
from crosslora.linalg import DEFAULT_SVD, DEFAULT_TRUNCATION_RANK, SVD_MODES
from crosslora.memory import check_fits
from crosslora.methods import DEFAULT_METHOD, Method, Params, expectation, get_method
from crosslora.pair_cache import PairCache, default_pair_dir
from crosslora.plan import TransferPlan, plan_transfer, resolve
from crosslora.refine import RefineParams, refine
from crosslora.refine import flops as refine_flops
from crosslora.refine import key as refine_key
from crosslora.refine import memory as refine_memory
from crosslora.report import build_report, model_card
from crosslora.speed import seconds_for

log = logging.getLogger("crosslora")
REFINE_MEASURED = ("the refine is measured on six pairs (docs/results.md, \"Refine\"): with 32 "
                   "prompts, shift took matched's mean 0.27 of the gap to 0.41 (+0.08 to +0.21 a "
                   "pair) and cost an unprompted task (HellaSwag) on the two pairs from Qwen2.5")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TransferOptions:
    method: str = DEFAULT_METHOD
    layer_map: str | None = None  # None: the method's default
    truncation_rank: int | None = DEFAULT_TRUNCATION_RANK  # None: full
    device: str = "auto"
    dtype: str | None = None  # None: the source adapter's dtype
    allow_pickle: bool = False
    svd: str = DEFAULT_SVD  # "fast" (randomized block Krylov) or "exact" (the full SVD)
    cache: bool = True  # keep SVD bases in an on-disk cache shared by later transfers
    cache_dir: str | None = None  # None: $CROSSLORA_HOME/bases or ~/.cache/crosslora/bases
    cache_min_elements: int = CACHE_MIN_ELEMENTS  # smaller weights are not worth caching
    draws: int = 1  # independent probe draws whose mean update is written (matched only)
    params: Params | None = None  # the method's parameters (its ``params_type``); None: defaults
    # the written adapter's base_model_name_or_path and its card's base_model; None: the target's
    # hub id where known (report.build_report), else its folder's name
    base_model_name_or_path: str | None = None
    # after the transfer, distil the source adapter into the target on text it writes (opt-in)
    refine: RefineParams | None = None


def check_options(options: TransferOptions) -> tuple[Method, torch.device]:
    """Validate the options that need no input; returns the method and the device."""
    device = resolve_device(options.device)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise CrossLoraError(f"--dtype {options.dtype}: choose from {', '.join(DTYPES)}")
    if options.svd not in SVD_MODES:
        raise CrossLoraError(f"--svd {options.svd}: choose from {', '.join(SVD_MODES)}")
    check_draws(options.draws, options.method)
    return get_method(options.method, options.params), device


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
    outs = [Path(out_path)]
    return run_transfers([adapter], source_model, target_model, outs, options, overwrite,
                         progress)[0]  # fmt: skip


def batch_outputs(adapters: list[str], out_parent: str | Path) -> list[Path]:
    """``<out_parent>/<adapter folder name>`` per adapter; names must be distinct."""
    outs = [Path(out_parent) / Path(str(a).rstrip("/")).name for a in adapters]
    seen: dict[Path, str] = {}
    for a, out in zip(adapters, outs):
        if out in seen:
            raise CrossLoraError(
                f"adapters {seen[out]} and {a} would both be written to {out} (same folder name)"
            )
        seen[out] = str(a)
    return outs


def transfer_batch(
    adapters: list[str],
    source_model: str,
    target_model: str,
    out_parent: str | Path,
    options: TransferOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Transfer several adapters between one pair of models in one pass; each adapter goes to
    ``<out_parent>/<its folder name>/``. Every base weight is read, and every basis computed,
    once for all of them (and the method's preparation runs once). Returns the reports."""
    outs = batch_outputs(adapters, out_parent)
    return run_transfers(adapters, source_model, target_model, outs, options, overwrite, progress)


def plan_transfers(
    adapters: list[str], source_model: str, target_model: str, options: TransferOptions
) -> tuple[list[Inputs], list[TransferPlan]]:
    """Resolve the inputs (headers only) and plan each adapter's transfer; nothing is written."""
    method, device = check_options(options)
    batch = resolve(adapters, source_model, target_model, options.allow_pickle)
    plans = [
        plan_transfer(inputs, method, options.layer_map, options.truncation_rank, device)
        for inputs in batch
    ]
    if options.refine is not None:
        src, tgt = batch[0].src, batch[0].tgt
        for inputs, plan in zip(batch, plans):
            plan.refine_memory = refine_memory(src, tgt, options.refine, device, inputs.adapter.r)
            plan.refine_seconds = seconds_for(refine_flops(src, tgt, options.refine), device)
    return batch, plans


def prepare_pair(
    adapters: list[str], source_model: str, target_model: str, options: TransferOptions,
    progress: bool = False,
) -> dict:  # fmt: skip
    """Make the method's preparation of this pair, and what each module of these adapters makes
    that a later adapter reads (``matched``: its fits), and keep them in the pair cache
    (``--cache``), so that every later transfer between the two models, here or on a Ray
    worker, reads them; nothing else is written and no adapter is transferred. Returns the
    cache's counts (``made``: 1 if the probe was made here, 0 if found) and the method's own
    (``matched``: ``pair_fits``, read and made)."""
    method, device = check_options(options)
    if not options.cache:
        raise CrossLoraError("preparing a pair ahead needs the cache (it is where it is kept)")
    pairs = PairCache(pair_dir(options))
    batch, plans = plan_transfers(adapters, source_model, target_model, options)
    prepared = prepare_modules(method, batch, plans, device, BasisSettings(pairs=pairs), progress)
    fits = getattr(prepared, "fits_counted", None)
    return {**pairs.stats(), **({"pair_fits": dict(fits)} if fits is not None else {})}


def run_transfers(
    adapters: list[str],
    source_model: str,
    target_model: str,
    outs: list[Path],
    options: TransferOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """The path every transfer takes: ``adapters[i]`` is written to ``outs[i]``.

    Before any input is read, each output folder is checked against the inputs (never one of
    them, inside one or containing one) and claimed (``io.output``); the inputs' resolved
    folders are checked again once known. Returns the reports."""
    options = options or TransferOptions()
    check_options(options)  # before anything is claimed or read
    given = _input_paths(adapters, source_model, target_model, options)
    for out in outs:
        check_separate(out, given)
    with claim_outputs(outs, overwrite) as claims:
        batch, plans = plan_transfers(adapters, source_model, target_model, options)
        resolved = [("adapter", inputs.adapter.path) for inputs in batch] + [
            ("source model", batch[0].src.checkpoint.path),
            ("target model", batch[0].tgt.checkpoint.path),
        ]
        for out in outs:
            check_separate(out, resolved)
        reports = run_plans(batch, plans, options, claims, progress)
    said, warn = expectation(options.method)
    (log.warning if warn else log.info)("%s: %s", "warning" if warn else "expect", said)
    if options.refine is not None:
        log.info("expect: %s", REFINE_MEASURED)
    return reports


def _input_paths(
    adapters: list[str], source_model: str, target_model: str, options: TransferOptions
) -> list[tuple[str, str]]:
    paths = [("adapter", str(a)) for a in adapters]
    paths += [("source model", str(source_model)), ("target model", str(target_model))]
    if options.cache:
        paths.append(("basis cache", str(options.cache_dir or default_cache_dir())))
        paths.append(("pair cache", str(pair_dir(options))))
        if options.refine is not None:
            paths.append(("refine cache", str(refine_dir(options))))
    return paths


def refine_dir(options: TransferOptions) -> Path:
    """``<--cache-dir>/refine``, else ``$CROSSLORA_HOME/refine``: interrupted refines' state."""
    return (Path(options.cache_dir) if options.cache_dir else default_cache_dir().parent) / "refine"


def pair_dir(options: TransferOptions) -> Path:
    """``<--cache-dir>/pairs``, else ``$CROSSLORA_HOME/pairs`` (``~/.cache/crosslora/pairs``)."""
    return Path(options.cache_dir) / "pairs" if options.cache_dir else default_pair_dir()


def basis_cache(options: TransferOptions) -> BasisCache | None:
    if not options.cache:
        return None
    return BasisCache(Path(options.cache_dir) if options.cache_dir else default_cache_dir())


def run_plans(
    batch: list[Inputs],
    plans: list[TransferPlan],
    options: TransferOptions,
    claims: list[OutputClaim],
    progress: bool,
) -> list[dict]:
    start = time.perf_counter()
    method, device = check_options(options)
    outs = [claim.out for claim in claims]
    if plans[0].memory:  # the plans share one pair of models, and the method's preparation
        check_fits(plans[0].memory, device, plans[0].method, output_filesystem(outs[0]))
    if plans[0].refine_memory:
        check_fits(plans[0].refine_memory, device, "refine", output_filesystem(outs[0]))
    return_large_frees()  # peak memory flat in the number of layers (glibc heap fragmentation)
    cache = basis_cache(options)
    pairs = PairCache(pair_dir(options)) if options.cache else None
    bases = BasisSettings(options.svd, cache, options.cache_min_elements, pairs)
    # finished factors wait on disk, in the output's filesystem, not in memory
    with Spool(output_filesystem(outs[0]), str(outs[0])) as spool:
        per_adapter = run_draws(method, options.draws, batch, plans, device, progress, bases,
                                spool)  # fmt: skip
        seconds = time.perf_counter() - start
        extra = {"basis_cache": cache.stats()} if cache is not None else {}  # the invocation's
        if pairs is not None:
            extra["pair_cache"] = pairs.stats()
        for results, _, _ in per_adapter:  # refuse before writing anything
            if not any(r.skipped is None for r in results):
                first = next((r for r in results if r.skipped), None)
                why = f" (first: {first.task.src.label}: {first.skipped})" if first else ""
                raise CrossLoraError(f"every module was skipped{why}; nothing written")
        out = []
        for inputs, plan, (results, written, diagnostics), claim in zip(
            batch, plans, per_adapter, claims
        ):
            plan.diagnostics = diagnostics
            factors, refined = None, None
            if options.refine is not None:
                factors, refined = _refine(inputs, plan, written, options, device, progress)
                seconds = time.perf_counter() - start
            out.append(_write(inputs, plan, results, written, options, device, claim, seconds,
                              extra, factors, refined))  # fmt: skip
        return out


def _refine(inputs: Inputs, plan: TransferPlan, written: list[ModuleResult],
            options: TransferOptions, device: torch.device, progress: bool) -> tuple:  # fmt: skip
    """The refine of one transferred adapter; its work folder (teacher text, checkpoints) lives
    in the cache, keyed by what decides it, so that an interrupted refine resumes; it goes once
    the refine is done. Without the cache it runs in one go."""
    params = options.refine
    factors = list(assemble(written))
    if not options.cache:
        return refine(inputs, plan.tasks, factors, params, device, None, progress)
    folder = refine_dir(options) / refine_key(inputs, factors, params)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the same refine runs elsewhere: this one runs in one go
            return refine(inputs, plan.tasks, factors, params, device, None, progress)
        result = refine(inputs, plan.tasks, factors, params, device, folder, progress)
        shutil.rmtree(folder, ignore_errors=True)
    return result


def _write(
    inputs: Inputs,
    plan: TransferPlan,
    results: list[ModuleResult],
    written: list[ModuleResult],
    options: TransferOptions,
    device: torch.device,
    claim: OutputClaim,
    seconds: float,
    extra: dict,
    factors: list | None = None,
    refined: dict | None = None,
) -> dict:
    settings = {**asdict(options), "device": str(device)}
    if options.refine is not None:  # the prompts are the user's text: counted, not copied
        settings["refine"] = {**settings["refine"], "prompts": len(options.refine.prompts)}
    out = claim.given
    report = {**build_report(inputs, plan, results, settings, seconds, out), **extra}
    if refined is not None:
        report["refine"] = refined
    tgt = inputs.tgt
    suffix_of = {
        t.tgt.slot.module: t.tgt.slot.module.split(f".{t.tgt.layer}.", 1)[1] for t in plan.tasks
    }
    name_of = {m: _short_name(s, list(tgt.family.modules)) for m, s in suffix_of.items()}
    layer_of = {r.task.tgt.slot.module: r.task.tgt.layer for r in results}
    selection = target_modules_for(adapted_modules(written), layer_of, name_of, tgt.num_layers)
    exclude = tgt.exclude_modules()  # a vision tower's q_proj is not the decoder's
    if exclude:
        selection["exclude_modules"] = exclude
    dtype = DTYPES[options.dtype] if options.dtype else inputs.adapter.dtype
    src_cfg = inputs.adapter.config
    # the weights file's metadata: the report's own account of where the adapter came from
    metadata = {"crosslora_version": report["crosslora_version"]} | {
        f"crosslora_{key}": str(report[key])
        for key in ("method", "source_model", "target_model", "source_adapter")
    }
    with claim.staged() as tmp:
        config = write_adapter(
            tmp, factors if factors is not None else assemble(written),
            base_model=report["base_model"],
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
        # one rank and one scale for every module (no rank/alpha patterns): how it was written
        report["written"] = {k: config[k] for k in ("r", "lora_alpha", "use_rslora")}
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
