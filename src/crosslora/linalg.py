"""Small linear-algebra pieces the methods share: SVD bases with a fixed sign convention."""

from __future__ import annotations

import torch


def fix_signs(
    u: torch.Tensor, v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic signs: flip each column of ``u`` so its largest-magnitude entry is positive.

    Singular pairs (u_i, v_i) are defined only up to a joint sign; ``v``'s matching columns (the
    first ``min`` of them) flip with ``u``'s. Ties go to the first index (``argmax``).
    """
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, idx[None, :]))[0]
    signs[signs == 0] = 1
    u = u * signs
    if v is not None:
        k = min(u.shape[1], v.shape[1])
        v = torch.cat([v[:, :k] * signs[:k], v[:, k:]], dim=1)
    return u, v


def svd_bases(
    w: torch.Tensor, k_left: int, k_right: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular bases of ``w`` (m, n): ``U`` (m, k_left), ``S``, ``V`` (n, k_right).

    When a ``k`` exceeds ``min(m, n)`` the extra columns complete the basis from the null space
    (the full SVD), so at ``k_left = m`` and ``k_right = n`` the bases are complete and
    ``U Uᵀ = I``, ``V Vᵀ = I``. Signs follow ``fix_signs`` on the paired columns; null-space
    columns are signed by the same rule on their own.
    """
    m, n = w.shape
    full = max(k_left, k_right) > min(m, n)
    u, s, vh = torch.linalg.svd(w, full_matrices=full)
    v = vh.mT
    p = min(m, n)
    u_pair, v_pair = fix_signs(u[:, :p], v[:, :p])
    u = torch.cat([u_pair, fix_signs(u[:, p:])[0]], dim=1) if u.shape[1] > p else u_pair
    v = torch.cat([v_pair, fix_signs(v[:, p:])[0]], dim=1) if v.shape[1] > p else v_pair
    return u[:, :k_left], s, v[:, :k_right]
