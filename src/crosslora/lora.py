"""LoRA factors: the unit every method consumes and produces. Never multiplied out.

``ΔW = scale · B @ A`` with ``A``: (r, in) and ``B``: (out, r), in the (out, in) orientation of a
``torch.nn.Linear`` weight whatever the module type (PEFT keeps Conv1D's LoRA factors in this
orientation too and transposes only the product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """``ΔW = scale · B @ A``; ``A``: (r, in), ``B``: (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA factors disagree: A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The (out, in) shape of ΔW."""
        return self.B.shape[0], self.A.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LoraFactors:
        return LoraFactors(self.A.to(device, dtype), self.B.to(device, dtype), self.scale)

    def delta(self) -> torch.Tensor:
        """ΔW, (out, in). For tests and small diagnostics only: it is what we never form."""
        return self.scale * (self.B @ self.A)

    def frobenius(self) -> float:
        """‖ΔW‖_F computed from the factors: sqrt(trace((BᵀB)(AAᵀ))), O((out+in)·r²)."""
        B, A = self.B.double(), self.A.double()
        gram = (B.T @ B) * (A @ A.T)  # elementwise: trace(XY) = sum(X * Yᵀ) with Y symmetric
        return abs(self.scale) * float(gram.sum().clamp_min(0).sqrt())

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.A).all() and torch.isfinite(self.B).all())


def refactor(factors: LoraFactors, r: int | None = None) -> LoraFactors:
    """Balanced, orthogonal re-factorisation of ``B @ A`` at rank ≤ ``r``.

    Exact if ``r`` is at least the product's rank; zero singular values are kept, so the rank is
    ``min(r, factors.r)`` whatever the numbers.

    QR of ``B`` and ``Aᵀ``, then an SVD of the small (r × r) core: ``B @ A = Q_B (R_B R_Aᵀ) Q_Aᵀ``.
    The result's factors are ``U √S`` and ``√S Vᵀ``. Cost is O((out+in)·r²); ``B @ A`` is never
    formed.
    """
    A, B = factors.A.double(), factors.B.double()
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(factors.r, r or factors.r)
    root = s[:keep].sqrt()
    new_b = (q_b @ u[:, :keep]) * root
    new_a = root[:, None] * (vh[:keep] @ q_a.T)
    dtype = factors.A.dtype
    return LoraFactors(new_a.to(dtype), new_b.to(dtype), factors.scale)
