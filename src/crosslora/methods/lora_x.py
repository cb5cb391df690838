"""``lora-x`` (LoRA-X, ICLR 2025), equal shapes only: project the update onto the target's top-k
singular subspaces, ``ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ``, then re-factorise to rank ≤ r.

Computed factored: ``(U_t (U_tᵀ B)) (A V_t) V_tᵀ`` already has rank ≤ r (a projection cannot
raise the rank), so the re-factorisation is an exact, balanced SVD of that product
(``lora.refactor``), never forming ΔW.
"""

from __future__ import annotations

from crosslora.arch.layout import Layout
from crosslora.core import ModuleTask
from crosslora.lora import LoraFactors, refactor
from crosslora.methods.base import (
    Method,
    MethodOutput,
    ModuleContext,
    Prepared,
    register,
    same_shapes,
    svd_flops,
)
from crosslora.speed import Work


@register
class LoraX(Method):
    name = "lora-x"
    truncates = True

    def check(self, src_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> str | None:
        return same_shapes(src_shape, tgt_shape)

    def flops(self, src: Layout, tgt: Layout, tasks: list[ModuleTask],
              truncation_rank: int | None) -> Work:  # fmt: skip
        return Work(svd_flops([(t.tgt.shape, t.tgt.shape) for t in tasks], truncation_rank) / 2)

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, prepared: Prepared) -> MethodOutput:
        m, n = ctx.tgt_shape
        k = min(ctx.truncation_rank or min(m, n), min(m, n))
        u_t, _, v_t = ctx.tgt_bases(k, k)
        projected = LoraFactors((lora.A @ v_t) @ v_t.T, u_t @ (u_t.T @ lora.B), lora.scale)
        out = refactor(projected, lora.r)
        kept = out.frobenius() / max(lora.frobenius(), 1e-30)
        return MethodOutput(out, {"k": k, "rank": out.r, "norm_kept": round(kept, 6)})
