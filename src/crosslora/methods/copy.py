"""``copy``: load the adapter unchanged on a target of the same shapes (a strong baseline
between related bases, per "Trivial Baselines: Re-evaluating LoRA Adapter Transfer")."""

from __future__ import annotations

from crosslora.lora import LoraFactors
from crosslora.methods.base import (
    Method,
    MethodOutput,
    ModuleContext,
    Prepared,
    register,
    same_shapes,
)


@register
class Copy(Method):
    name = "copy"

    def check(self, src_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> str | None:
        return same_shapes(src_shape, tgt_shape)

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, prepared: Prepared) -> MethodOutput:
        return MethodOutput(lora)
