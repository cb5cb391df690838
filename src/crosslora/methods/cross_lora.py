"""``cross-lora``: Cross-LoRA (arXiv 2508.05232), in the defined reading of docs/methods.md.

LoRA-Align: truncated SVDs of the two base weights, ``W_s ≈ U_s Σ_s V_sᵀ`` and
``W_t ≈ U_t Σ_t V_tᵀ``; the Frobenius-optimal maps between the subspaces are
``P_U = U_t U_sᵀ`` (m' × m) and ``P_V = V_t V_sᵀ`` (n' × n).
LoRA-Shift: ``B_t = U_t (U_sᵀ B_s)`` and ``A_t = (A_s V_s) V_tᵀ``, so
``ΔW_t = U_t (U_sᵀ ΔW_s V_s) V_tᵀ``; the rank is kept and no m' × m matrix is formed.

Truncation: ``k_U = min(k, m, m')`` left and ``k_V = min(k, n, n')`` right components (paper:
k = 320). Past ``min(m, n)`` components come from the null space (complete bases), so with
source = target and k at least the larger dimension the transfer is the identity.

Bases come from ``ctx.src_bases``/``ctx.tgt_bases``: the full SVD (``--svd exact``) or a
randomized subspace iteration matching it closely (``--svd fast``, see ``linalg.FastSvd``), read
from the basis cache when one is in use.

Known weak points, kept visible: the i-th singular direction of one model is matched to the
i-th of the other by rank order alone; signs follow ``linalg.fix_signs`` (largest-magnitude entry
of each u_i positive) and the result depends on that convention; near-equal singular values can
swap order. The diagnostic ``norm_kept`` = ‖ΔW_t‖/‖ΔW_s‖ is the share of the update that lies
in the truncated source subspaces.
"""

from __future__ import annotations

from crosslora.arch.layout import Layout
from crosslora.core import ModuleTask
from crosslora.lora import LoraFactors
from crosslora.methods.base import (
    Method,
    MethodOutput,
    ModuleContext,
    Prepared,
    register,
    svd_flops,
)
from crosslora.speed import Work


@register
class CrossLora(Method):
    name = "cross-lora"
    recovered = 0.001  # docs/results.md, the six-pair table
    truncates = True

    def flops(self, src: Layout, tgt: Layout, tasks: list[ModuleTask],
              truncation_rank: int | None) -> Work:  # fmt: skip
        return Work(svd_flops([(t.src.shape, t.tgt.shape) for t in tasks], truncation_rank))

    def transfer(self, lora: LoraFactors, ctx: ModuleContext, prepared: Prepared) -> MethodOutput:
        (m, n), (mt, nt) = ctx.src_shape, ctx.tgt_shape
        k = ctx.truncation_rank or max(m, n, mt, nt)
        k_u, k_v = min(k, m, mt), min(k, n, nt)
        u_s, _, v_s = ctx.src_bases(k_u, k_v)
        u_t, _, v_t = ctx.tgt_bases(k_u, k_v)
        B = u_t @ (u_s.T @ lora.B)
        A = (lora.A @ v_s) @ v_t.T
        out = LoraFactors(A, B, lora.scale)
        kept = out.frobenius() / max(lora.frobenius(), 1e-30)
        return MethodOutput(out, {"k_u": k_u, "k_v": k_v, "norm_kept": round(kept, 6)})
