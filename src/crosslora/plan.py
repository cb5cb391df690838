"""Resolve the inputs and plan the transfer from headers alone: modules, shapes, layer map.

The plan is cheap (no weight is read) and printable (``--dry-run``): each task pairs one role
of one source layer with the same role of its mapped target layer; every module that will not
be transferred is listed with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from crosslora.arch.layout import ROLES, Layout
from crosslora.core import Inputs, ModuleTask, Skip
from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import Checkpoint
from crosslora.io.peft_adapter import Adapter, read_adapter
from crosslora.layer_map import LayerMap, map_layers, ranges
from crosslora.linalg import DEFAULT_TRUNCATION_RANK
from crosslora.memory import MemoryNeed
from crosslora.methods import METHODS, Method, expectation
from crosslora.speed import duration, seconds_for

log = logging.getLogger("crosslora")

CPU = torch.device("cpu")


def resolve(
    adapters: list[str], source_model: str, target_model: str, allow_pickle: bool = False
) -> list[Inputs]:
    """Open the adapters and both checkpoints (headers and configs only); the inputs of the
    adapters (one or several, for one pair of models) share the two layouts."""
    ads = [read_adapter(a, allow_pickle=allow_pickle) for a in adapters]
    src = Layout(Checkpoint(source_model, "source model"), "source model")
    tgt = Layout(Checkpoint(target_model, "target model"), "target model")
    return [Inputs(ad, src, tgt, str(source_model), str(target_model)) for ad in ads]


@dataclass
class TransferPlan:
    method: str
    layer_map: LayerMap
    truncation_rank: int | None
    tasks: list[ModuleTask]
    skipped: list[Skip] = field(default_factory=list)
    diagnostics: dict = field(default_factory=dict)  # the method's, for the whole transfer
    memory: MemoryNeed | None = None  # the method's peak beyond streaming the weights
    seconds: float = 0.0  # estimated from the work's size and this machine's speed
    refine_memory: MemoryNeed | None = None  # --refine's peak, after the transfer
    refine_seconds: float = 0.0

    def describe(self) -> str:
        """A human-readable plan: the layer map, every task with shapes, every skip."""
        lm = self.layer_map
        lines = [
            f"method: {self.method}"
            + (
                f" (truncation rank {self.truncation_rank or 'full'})"
                if METHODS[self.method].truncates
                else ""
            ),
            f"layer map: {lm.kind}, {lm.src_layers} source -> {lm.tgt_layers} target layers, "
            f"{len(lm.pairs)} matched",
            "  " + " ".join(f"{i}->{j}" for i, j in sorted(lm.pairs.items())),
        ]
        if lm.unmatched_src:
            lines.append(f"  source layers dropped: {ranges(lm.unmatched_src)}")
        if lm.unmatched_tgt:
            lines.append(f"  target layers left without adapter: {ranges(lm.unmatched_tgt)}")
        lines.append(f"modules: {len(self.tasks)} to transfer, {len(self.skipped)} skipped")
        for t in self.tasks:
            lines.append(
                f"  L{t.src.layer:<3} {t.src.role:<5} {t.src.label} {_shape(t.src.shape)}"
                f" -> {t.tgt.label} {_shape(t.tgt.shape)}"
            )
        for s in self.skipped:
            lines.append(f"  skip {s.what}: {s.reason}")
        then = METHODS[self.method].then
        if then:
            lines.append(f"then: {then}")
        if self.memory:
            lines.append(f"memory: {self.memory.describe()}")
        if self.seconds > 0:
            lines.append(
                f"time: about {duration(self.seconds)} on this machine (from its speed and "
                "the work's size; within about a factor of two)"
            )
        if self.refine_memory:
            lines.append("then: refine, distilling the source adapter into the target on text "
                         "the source writes with it")  # fmt: skip
            lines.append(f"refine memory: {self.refine_memory.describe()}")
            lines.append(f"refine time: about {duration(self.refine_seconds)} on this machine "
                         "(within about a factor of two)")  # fmt: skip
        said, warn = expectation(self.method)
        lines.append(f"{'warning' if warn else 'expect'}: {said}")
        return "\n".join(lines)


def _shape(shape: tuple[int, int]) -> str:
    return f"({shape[0]}x{shape[1]})"


def _check_adapter_layers(adapter: Adapter, src: Layout) -> None:
    """Every adapted layer is one the source model has, and one that ``layers_to_transform``
    (where given) lists: else part of the adapter would be dropped without a word."""
    n = src.num_layers
    parsed = sorted((p[0], name) for name in adapter.modules if (p := src.parse_module(name)))
    beyond = [(layer, name) for layer, name in parsed if layer >= n]
    if beyond:
        layer, name = beyond[0]
        raise CrossLoraError(
            f"adapter key {adapter.modules[name].a_key}: layer {layer} is beyond the source "
            f"model's {n} layers (0-{n - 1}); is --source-model the model the adapter was "
            "trained on?"
        )
    layers = adapter.config.get("layers_to_transform")
    if layers is None:
        return
    wanted = {layers} if isinstance(layers, int) else set(layers)
    outside = sorted(x for x in wanted if x >= n)
    if outside:
        raise CrossLoraError(
            f"adapter config: layers_to_transform names layer {outside[0]}, outside the source "
            f"model's layers 0-{n - 1}"
        )
    unlisted = [(layer, name) for layer, name in parsed if layer not in wanted]
    if unlisted:
        layer, name = unlisted[0]
        raise CrossLoraError(
            f"adapter module {name} has weights, but its layer {layer} is not in "
            f"layers_to_transform ({ranges(sorted(wanted))})"
        )


def plan_transfer(
    inputs: Inputs,
    meth: Method,
    layer_map: str | None = None,
    truncation_rank: int | None = DEFAULT_TRUNCATION_RANK,
    device: torch.device = CPU,
) -> TransferPlan:
    """Pair every adapted source role with its target role; check shapes; collect skips; say
    how much memory the method needs on ``device``."""
    method = meth.name
    layer_map = layer_map or meth.default_layer_map
    if truncation_rank is not None and truncation_rank <= 0:
        raise CrossLoraError(f"--truncation-rank must be positive, got {truncation_rank}")
    src, tgt, adapter = inputs.src, inputs.tgt, inputs.adapter
    if method != "copy" and src.checkpoint.same_model(tgt.checkpoint):
        paths = {str(src.checkpoint.path): None, str(tgt.checkpoint.path): None}
        raise CrossLoraError(
            f"the source and target models are the same model ({' and '.join(paths)}): the "
            "adapter already fits it; use it as it is (or pass --method copy to copy it)"
        )
    _check_adapter_layers(adapter, src)
    lmap = map_layers(layer_map, src.num_layers, tgt.num_layers)
    tasks: list[ModuleTask] = []
    skipped: list[Skip] = []
    foreign: list[str] = []
    for name, mod in adapter.modules.items():
        parsed = src.parse_module(name)
        if parsed is None:
            foreign.append(name)
            continue
        layer, suffix = parsed
        refs = src.slot_roles(layer, suffix)
        if not refs:
            raise CrossLoraError(
                f"adapter module {name}: the source model has no weight for it (wrong model?)"
            )
        slot = refs[0].slot
        in_f = refs[0].shape[1]
        if mod.shape != (slot.out_features, in_f):
            raise CrossLoraError(
                f"adapter does not fit the source model: {name} has ΔW shape {mod.shape}, "
                f"the source weight is {(slot.out_features, in_f)}"
            )
        if mod.r > min(mod.shape):
            raise CrossLoraError(
                f"adapter module {name}: rank {mod.r} exceeds its matrix {mod.shape}"
            )
        for ref in refs:
            what = f"{name}" + (f"[{ref.role}]" if len(slot.roles) > 1 else "")
            if layer not in lmap.pairs:
                skipped.append(
                    Skip(what, f"source layer {layer} has no target layer ({lmap.kind} map)")
                )
                continue
            tref = tgt.role(lmap.pairs[layer], ref.role)
            if tref is None:
                why = tgt.absent_reason(ref.role) or f"the target has no {ref.role!r} module"
                skipped.append(Skip(what, why))
                continue
            reason = meth.check(ref.shape, tref.shape)
            if reason:
                skipped.append(Skip(what, f"{method} {reason}"))
                continue
            tasks.append(ModuleTask(ref, tref, name))
    # the modules the source family does not transfer (``not_transferred``: a vision tower,
    # mixture-of-experts experts), and LoRAs that PEFT put on a parameter (``target_parameters``)
    for n in [*(n for n in foreign if src.skip_reason(n)), *adapter.parameter_modules]:
        why = src.skip_reason(n) or "a LoRA on a parameter (target_parameters): not transferred"
        skipped.append(Skip(n, why))
    foreign = [n for n in foreign if src.skip_reason(n) is None]
    if foreign:
        if len(foreign) == len(adapter.modules):
            raise CrossLoraError(
                f"none of the adapter's modules is a {src.family.name}-family module of the source "
                f"model (first: {foreign[0]}); is target_modules/--source-model right?"
            )
        skipped.extend(
            Skip(n, "not a q/k/v/o/gate/up/down module of the source family") for n in foreign
        )
    if not tasks:
        first = f" (first: {skipped[0].what}: {skipped[0].reason})" if skipped else ""
        raise CrossLoraError(f"nothing to transfer with method {method}{first}")
    tasks.sort(key=lambda t: (t.src.layer, ROLES.index(t.src.role)))
    memory = meth.memory(src, tgt, device)
    work = meth.flops(src, tgt, tasks, truncation_rank)
    seconds = seconds_for(work, device) if any(work) else 0.0
    return TransferPlan(method, lmap, truncation_rank, tasks, skipped, memory=memory,
                        seconds=seconds)  # fmt: skip
