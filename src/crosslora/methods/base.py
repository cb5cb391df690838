"""The method interface: one module's LoRA factors in, the target module's factors out.

A method is its parameters (a typed dataclass, ``Params``) and four steps, each of which computes
and returns; the executor applies what they return:

- ``prepare`` (once per run, shared by a batch of adapters): work common to every module, such
  as fitted maps, returned as the method's own ``Prepared`` object;
- ``transfer`` (per module): factors of the target role's shape, or ``Unsupported`` with the
  reason; the context reads the two base weights lazily (float32, (out, in));
- ``calibrate`` (per adapter, after its last module): factors for the results' ``B`` sizes;
- ``memory``: what the method needs beyond streaming the weights, for the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from crosslora.arch.layout import Layout, RoleRef
from crosslora.core import Inputs, ModuleResult, ModuleTask
from crosslora.io.spool import Spool
from crosslora.linalg import DEFAULT_SVD, svd_bases
from crosslora.lora import LoraFactors
from crosslora.memory import MemoryNeed
from crosslora.pair_cache import PairCache
from crosslora.speed import Work

Bases = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Unsupported(Exception):
    """This method cannot transfer this module; the message says why (goes to report and stderr)."""


@dataclass
class ModuleContext:
    """What a method may use for one module. Weights load on first use; (out, in), float32."""

    src_shape: tuple[int, int]
    tgt_shape: tuple[int, int]
    device: torch.device
    truncation_rank: int | None  # None: full (complete bases)
    load_src_weight: Callable[[], torch.Tensor]
    load_tgt_weight: Callable[[], torch.Tensor]
    src: RoleRef | None = None  # where the role lives in each model (for methods that need more
    tgt: RoleRef | None = None  # than the two weights: norms, sibling modules, embeddings)
    src_layout: Layout | None = None
    tgt_layout: Layout | None = None
    svd: str = DEFAULT_SVD  # how src_bases/tgt_bases compute: "exact" (full SVD) or "fast"
    # (side, k_left, k_right, load weight) -> (U, S, V): where bases come from (a cache); None:
    # computed here with ``svd_bases``
    basis_source: Callable[[str, int, int, Callable[[], torch.Tensor]], Bases] | None = None
    _cache: dict = field(default_factory=dict)

    def src_weight(self) -> torch.Tensor:
        if "src" not in self._cache:
            self._cache["src"] = self.load_src_weight()
        return self._cache["src"]

    def tgt_weight(self) -> torch.Tensor:
        if "tgt" not in self._cache:
            self._cache["tgt"] = self.load_tgt_weight()
        return self._cache["tgt"]

    def src_bases(self, k_left: int, k_right: int) -> Bases:
        """``svd_bases`` of the source weight (``U`` (m, k_left), ``S``, ``V`` (n, k_right))."""
        return self._bases("src", k_left, k_right)

    def tgt_bases(self, k_left: int, k_right: int) -> Bases:
        return self._bases("tgt", k_left, k_right)

    def _bases(self, side: str, k_left: int, k_right: int) -> Bases:
        key = ("bases", side, k_left, k_right)
        if key not in self._cache:
            load = self.src_weight if side == "src" else self.tgt_weight
            if self.basis_source is not None:
                bases = self.basis_source(side, k_left, k_right, load)
            else:
                bases = svd_bases(load(), k_left, k_right, self.svd)
            self._cache[key] = tuple(t.to(self.device) for t in bases)
            self._cache.pop(side, None)  # the weight itself is no longer needed by the SVD methods
        return self._cache[key]


@dataclass
class MethodOutput:
    factors: LoraFactors  # on the target: A (r, in'), B (out', r)
    diagnostics: dict[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Params:
    """A method's parameters; a method with parameters declares its own subclass."""


@dataclass
class Prepared:
    """What ``prepare`` returns: the method's own state for this run (a subclass adds fields) and
    diagnostics for the report."""

    diagnostics: dict = field(default_factory=dict)


@dataclass
class Calibration:
    """What ``calibrate`` decided for one adapter: per result (in the order given), factors its
    ``B`` is multiplied by, one after the other, and diagnostics merged into its own; and
    diagnostics for the report."""

    scales: list[tuple[float, ...]]
    module_diagnostics: list[dict]
    diagnostics: dict


class Method:
    """Base class. Subclasses set ``name``, implement ``transfer`` and may override the rest."""

    name: ClassVar[str]
    params_type: ClassVar[type[Params]] = Params
    default_layer_map: ClassVar[str] = "index"
    truncates: ClassVar[bool] = False  # whether --truncation-rank applies
    then: ClassVar[str | None] = None  # what ``calibrate`` does after the modules, for the plan
    draws: ClassVar[bool] = False  # whether the method draws random probe text (``--draws``)
    # what the six-pair benchmark measured (docs/results.md): the mean share of a target-trained
    # adapter's effect (NLL gap) the transfer recovers; None where the method is not in it
    recovered: ClassVar[float | None] = None

    def __init__(self, params: Params | None = None) -> None:
        self.params = params if params is not None else self.params_type()

    def for_draw(self, draw: int) -> Method:
        """The method for independent draw ``draw`` (0, 1, ...) of a method that draws."""
        return self

    def memory(self, src: Layout, tgt: Layout, device: torch.device) -> MemoryNeed | None:
        """The peak memory this method needs for these two models beyond what streaming the
        weights takes, or None when that is all (the default)."""
        return None

    def flops(self, src: Layout, tgt: Layout, tasks: list[ModuleTask],
              truncation_rank: int | None) -> Work:  # fmt: skip
        """About how many operations the transfer of ``tasks`` costs (float32 products, float64
        factorisations), for the plan's time estimate. Default: nothing worth counting (the
        factors alone)."""
        return Work()

    def check(self, src_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> str | None:
        """Why this method cannot handle these (out, in) shapes, or None. Called when planning."""
        return None

    def prepare(
        self, src: Layout, tgt: Layout, device: torch.device, spool: Spool | None = None,
        cache: PairCache | None = None,
    ) -> Prepared:  # fmt: skip
        """Work shared by all modules (and adapters), before the first one; large intermediates
        may be parked in ``spool`` (on the output's disk, gone when it closes), and what a
        later run between the same models can reuse kept in ``cache``."""
        return Prepared()

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, prepared: Prepared) -> MethodOutput:
        raise NotImplementedError

    def prepare_module(self, ctx: ModuleContext, prepared: Prepared) -> None:
        """Make, for this module, what ``transfer`` would make that does not depend on the
        adapter and that ``prepare``'s cache keeps for later adapters (nothing by default): run
        once ahead of a collection, so that its tasks only read it."""

    def calibrate(
        self, inputs: Inputs, results: list[ModuleResult], prepared: Prepared
    ) -> Calibration | None:
        """After every module of one adapter, how to resize its results (None: as they are)."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def same_shapes(src_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> str | None:
    if src_shape != tgt_shape:
        return f"needs equal shapes, got {src_shape} -> {tgt_shape}"
    return None


def svd_flops(shapes: list[tuple[tuple[int, int], tuple[int, int]]], k: int | None) -> float:
    """The fast SVD bases of both weights of every task (``linalg.FastSvd``: a Krylov space of
    ``L = b (steps + 1)`` columns, ``b = k / 8``, 24 steps, each two products, and a Rayleigh-Ritz
    projection: about ``6000 m n`` operations per weight at k = 320)."""
    total = 0.0
    for pair in shapes:
        for m, n in pair:
            kk = min(k or min(m, n), min(m, n))
            total += 2 * m * n * (kk / 8) * (2 * 25 + 25)
    return total
