"""The fits of ``matched``: ridge regressions between the two models' activations, the
residual-stream isometry, and the cap that keeps a mapped update from acting larger than on the
source (docs/methods.md, "matched"). All in float64; shapes in the docstrings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from crosslora.lora import LoraFactors
from crosslora.methods.base import MethodOutput, Unsupported


class Ridge:
    """``(G + λ I)⁻¹`` for ``G = Xᵀ X`` as a Cholesky factor, float64, ``λ = alpha tr(G)/n``."""

    def __init__(self, x: torch.Tensor, alpha: float) -> None:
        # the factorisation in float64; the product too where it is cheap (n <= 1024), else in
        # float32 (a 5000 x 4864 product is 8x slower in float64 on a CPU)
        gram = x.double().mT @ x.double() if x.shape[1] <= 1024 else (x.mT @ x).double()
        n = gram.shape[0]
        lam = alpha * float(gram.diagonal().sum()) / n
        if not lam > 0:
            raise Unsupported("the probe activations of this module are all zero")
        added = 0.0  # G + boost·λI in place: the Gram matrix and its factor, nothing more
        for boost in (1.0, 10.0, 100.0):  # float32 rounding can leave G + λI barely indefinite
            gram.diagonal().add_(boost * lam - added)
            added = boost * lam
            self.chol, info = torch.linalg.cholesky_ex(gram)
            if int(info) == 0:
                return
        raise Unsupported("the probe activations' Gram matrix is not positive definite")

    @classmethod
    def from_factor(cls, chol: torch.Tensor) -> Ridge:
        """A ridge made before, from its Cholesky factor (read back from the pair cache)."""
        ridge = cls.__new__(cls)
        ridge.chol = chol
        return ridge

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rhs.double(), self.chol)


class Probe(NamedTuple):
    """One module's probe data on one side: its inputs ``x`` (N, n) and base outputs
    ``y = x Wᵀ`` (N, m) at the aligned positions."""

    x: torch.Tensor
    y: torch.Tensor


def map_output(y_s: torch.Tensor, y_t: torch.Tensor, ridge_s: Ridge, b: torch.Tensor):
    """``M b`` with ``M = Y_tᵀ Y_s (Y_sᵀ Y_s + λ)⁻¹`` (m_t × m_s), never formed."""
    return y_t.double().mT @ (y_s.double() @ ridge_s.solve(b))


def procrustes(h_s: torch.Tensor, h_t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The residual-stream map ``M_res = c Q`` (m_t × m_s, float64) and its relative residual
    ``‖H_t − c H_s Qᵀ‖ / ‖H_t‖``, for ``h_s`` (N, m_s) and ``h_t`` (N, m_t) at the same positions.

    ``Q = U Vᵀ`` from ``H_tᵀ H_s = U Σ Vᵀ`` is semi-orthogonal (``Qᵀ Q = I`` when m_t ≥ m_s, where
    it is the orthogonal Procrustes solution; ``Q Qᵀ = I`` otherwise, exact where what the target
    drops is uncorrelated with what it keeps) and ``c = tr Σ / ‖H_s Qᵀ‖²`` the best scale."""
    hs, ht = h_s.double(), h_t.double()
    u, sv, vh = torch.linalg.svd(ht.mT @ hs, full_matrices=False)
    q = u @ vh
    fit = hs @ q.mT
    c = float(sv.sum()) / max(float(fit.pow(2).sum()), 1e-30)
    return c * q, rel(c * fit, ht)


def rel(fit: torch.Tensor, want: torch.Tensor) -> float:
    return float((fit - want).norm() / want.norm().clamp_min(1e-30))


def median_rms(y: torch.Tensor) -> float:
    return float(y.double().pow(2).mean(dim=1).sqrt().median().clamp_min(1e-30))


def out_fit(y_s: torch.Tensor, y_t: torch.Tensor, ridge: Ridge) -> float:
    """How well the output map explains the target's outputs from the source's, on 16 random
    directions of the target's output space (an unbiased estimate of the relative residual)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(y_t.shape[1], 16, dtype=torch.float64, generator=gen)
    want = y_t.double() @ probe.to(y_t.device)
    return rel(y_s.double() @ ridge.solve(y_s.double().mT @ want), want)


def output(a_t, b_t, lora: LoraFactors, src: Probe, tgt: Probe, in_fit: float,
            out_fit: float) -> MethodOutput:  # fmt: skip
    """The factors, capped at the source's relative effect (see ``shrinkage``)."""
    out = LoraFactors(a_t.float(), b_t.float(), lora.scale)
    if not out.is_finite():
        raise Unsupported("the fitted maps produced NaN or Inf")
    shrink = shrinkage(relative_effect(src, lora), relative_effect(tgt, out))
    out = LoraFactors(out.A, out.B * shrink, out.scale)
    return MethodOutput(out, {"in_fit": round(in_fit, 6), "out_fit": round(out_fit, 6),
                              "shrink": round(shrink, 6)})  # fmt: skip


def relative_effect(p: Probe, lora: LoraFactors) -> float:
    """``‖X ΔWᵀ‖ / ‖X Wᵀ‖`` on the probe: the update's size relative to the module's own output,
    in function space (unchanged by reparametrisations such as folded norm gains)."""
    x = p.x.double()
    delta = (x @ lora.A.to(x.device).double().mT) @ lora.B.to(x.device).double().mT
    return abs(lora.scale) * float(delta.norm()) / max(float(p.y.double().norm()), 1e-30)


def shrinkage(rel_s: float, rel_t: float) -> float:
    """The mapped update's scale: ``min(1, rel_s / rel_t)``, ``rel = ‖X ΔWᵀ‖/‖X Wᵀ‖`` on the
    probe: the update never acts larger, relative to its module's output, than on the source.

    The fits need no further shrinking: a least-squares reproduction is already the shrunk
    estimate (in-sample ``‖X_t A_tᵀ‖ ≈ √(1 − in_fit²) ‖X_s A_sᵀ‖``, equal for least squares: it
    keeps the part of the source's features the target can read and drops the rest, as does the
    output map). Multiplying by ``(1 − in_fit²)(1 − out_fit²)`` on top shrinks twice: on the
    development task, dropping that factor raised the gap recovered on five of six pairs (mean
    0.081 → 0.113) and lowered it on one (docs/results.md). ``in_fit`` and ``out_fit`` stay in
    the report as diagnostics. On exact maps (twins) the factor is 1.
    """
    return min(1.0, rel_s / max(rel_t, 1e-30))
