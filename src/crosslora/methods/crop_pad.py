"""``crop-pad``: what Cross-LoRA's released code does. ``lora_A`` (r, n) becomes (r, n') and
``lora_B`` (m, r) becomes (m', r), keeping the first columns / rows or padding with zeros."""

from __future__ import annotations

import torch

from crosslora.lora import LoraFactors
from crosslora.methods.base import Method, MethodOutput, ModuleContext, Prepared, register


def fit(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Keep the first ``size`` entries along ``dim``, or zero-pad up to ``size``."""
    have = x.shape[dim]
    if have >= size:
        return x.narrow(dim, 0, size)
    pad_shape = list(x.shape)
    pad_shape[dim] = size - have
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


@register
class CropPad(Method):
    name = "crop-pad"
    recovered = -0.006  # docs/results.md, the six-pair table

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, prepared: Prepared) -> MethodOutput:
        out_t, in_t = ctx.tgt_shape
        A, B = fit(lora.A, in_t, 1), fit(lora.B, out_t, 0)
        kept = LoraFactors(A, B, lora.scale).frobenius() / max(lora.frobenius(), 1e-30)
        return MethodOutput(LoraFactors(A, B, lora.scale), {"norm_kept": round(kept, 6)})
