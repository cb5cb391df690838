"""The method interface: one module's LoRA factors in, the target module's factors out.

A method sees one (source role, target role) pair at a time. It may read the two base weights
through the context (lazily, float32, (out, in) orientation); it must keep the factors factored
and return factors of the target role's shape, or raise ``Unsupported`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from crosslora.lora import LoraFactors

if TYPE_CHECKING:
    from crosslora.arch.layout import Layout, RoleRef


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
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def src_weight(self) -> torch.Tensor:
        if "src" not in self._cache:
            self._cache["src"] = self.load_src_weight()
        return self._cache["src"]

    def tgt_weight(self) -> torch.Tensor:
        if "tgt" not in self._cache:
            self._cache["tgt"] = self.load_tgt_weight()
        return self._cache["tgt"]


@dataclass
class MethodOutput:
    factors: LoraFactors  # on the target: A (r, in'), B (out', r)
    diagnostics: dict[str, float | int | str] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set ``name``, implement ``transfer`` and may override ``check``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_weights: ClassVar[bool] = False
    default_layer_map: ClassVar[str] = "index"
    truncates: ClassVar[bool] = False  # whether --truncation-rank applies

    def prepare(self, src: Layout, tgt: Layout, device: torch.device) -> dict:
        """Work shared by all modules (e.g. residual-stream maps), before the first one.

        Returns diagnostics for the transfer report. Default: nothing to do.
        """
        return {}

    def check(self, src_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> str | None:
        """Why this method cannot handle these (out, in) shapes, or None. Called when planning."""
        return None

    def transfer(self, lora: LoraFactors, ctx: ModuleContext) -> MethodOutput:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def same_shapes(src_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> str | None:
    if src_shape != tgt_shape:
        return f"needs equal shapes, got {src_shape} -> {tgt_shape}"
    return None
