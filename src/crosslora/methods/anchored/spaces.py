"""Maps between the two models' residual streams, anchored in the shared vocabulary, and the
norm gains and effective weights that the anchored method works with.

Coordinates are *effective*: a module that reads the residual stream sees the normalised
residual ``ĥ`` through ``W̃ = W diag(g_in)`` (the norm gain ``g`` folded in; Gemma's ``1 + γ``
included); a module that writes it under a post-norm contributes ``diag(g_post) W``.

Two anchors give residual maps, both fitted by ridge least squares over the shared tokens:

- embeddings (vectors in the residual stream, embedding scale folded in):
  ``R_e = argmin ‖Ẽ_t Rᵀ − Ẽ_s‖`` maps target coordinates to source ones, ``Q_e`` the reverse;
- unembeddings (covectors on the normalised final residual, final-norm gain folded in):
  ``Ũ_t ≈ Ũ_s R_u`` and ``Ũ_s ≈ Ũ_t Q_u``.

Layer ``i`` of ``L`` uses ``(1 − t) R_e + t R_u`` with ``t = i / (L − 1)`` (each map first scaled
to unit RMS singular value, so neither anchor dominates by scale alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from crosslora.arch.layout import Layout
from crosslora.errors import CrossLoraError

HELD_OUT = 10  # every HELD_OUT-th shared token is held out to measure the map's generalisation


RIDGES = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


def ridge_solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_M ‖x M − y‖² + λ‖M‖²`` through the SVD of ``x``, float64; λ = ridge · σ_max²."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    lam = ridge * float(s.max()) ** 2
    return vh.mT @ ((s / (s * s + lam))[:, None] * (u.mT @ y.double()))


def ridge_cv(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Ridge map ``x M ≈ y`` with λ chosen data-free: the ``RIDGES`` value whose fit on the kept
    rows best predicts the held-out rows (shared tokens, not data). Refitted on all rows."""
    u, s, vh = torch.linalg.svd(x[~held].double(), full_matrices=False)
    uty = u.mT @ y[~held].double()
    best = None
    for ridge in RIDGES:
        lam = ridge * float(s.max()) ** 2
        m = vh.mT @ ((s / (s * s + lam))[:, None] * uty)
        err = rel_residual(x[held].double() @ m, y[held].double())
        if best is None or err < best[1]:
            best = (ridge, err, rel_residual(x[~held].double() @ m, y[~held].double()))
    ridge, heldout, fit = best
    return ridge_solve(x, y, ridge), {"ridge": ridge, "fit_residual": round(fit, 6),
                                      "heldout_residual": round(heldout, 6)}  # fmt: skip


def pinv(x: torch.Tensor, rcond: float) -> torch.Tensor:
    """Rank-truncated pseudo-inverse (singular values below ``rcond · σ_max`` dropped), float64."""
    return torch.linalg.pinv(x.double(), rtol=rcond)


def rel_residual(fit: torch.Tensor, want: torch.Tensor) -> float:
    return float((fit - want).norm() / want.norm().clamp_min(1e-30))


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m * (math.sqrt(min(m.shape)) / float(m.norm().clamp_min(1e-30)))


def embeddings(layout: Layout, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``ids`` of the effective embedding and unembedding matrices, float64.

    Embeddings carry the family's input scale (Gemma: √hidden); unembeddings the final-norm gain.
    Tied models use the embedding matrix for both.
    """
    fam, ckpt = layout.family.data, layout.checkpoint
    embed_key = ckpt.find(fam["embed"])
    if embed_key is None:
        raise CrossLoraError(f"{layout.what}: no embedding matrix ({fam['embed']}.weight)")
    head_key = ckpt.find(fam["lm_head"]) or embed_key
    embed = ckpt.get(embed_key)[ids].double()
    if fam.get("embed_scale") == "sqrt_hidden":
        embed = embed * math.sqrt(layout.dims.hidden)
    head = ckpt.get(head_key)[ids].double()
    final = layout.norm_gain("final_norm", None)
    if final is not None:
        head = head * final
    return embed, head


@dataclass
class ResidualMaps:
    """Residual-stream maps at the two anchors; ``at(t)`` interpolates by relative depth."""

    to_src_e: torch.Tensor  # (d_s, d_t): target coordinates -> source coordinates, embeddings
    to_tgt_e: torch.Tensor  # (d_t, d_s)
    to_src_u: torch.Tensor  # (d_s, d_t), unembeddings
    to_tgt_u: torch.Tensor  # (d_t, d_s)
    diagnostics: dict

    def at(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, Q)`` at relative depth ``t`` in [0, 1]: R (d_s, d_t), Q (d_t, d_s)."""
        mix = lambda e, u: (1 - t) * _unit(e) + t * _unit(u)  # noqa: E731
        return mix(self.to_src_e, self.to_src_u), mix(self.to_tgt_e, self.to_tgt_u)


def fit_residual_maps(
    src: Layout, tgt: Layout, src_ids: torch.Tensor, tgt_ids: torch.Tensor
) -> ResidualMaps:
    """Fit the four residual maps over the shared tokens, each with its ridge chosen on held-out
    shared tokens (``ridge_cv``); their residuals go to the diagnostics."""
    n_s = src.checkpoint.shape(src.checkpoint.find(src.family.data["embed"]))[0]
    n_t = tgt.checkpoint.shape(tgt.checkpoint.find(tgt.family.data["embed"]))[0]
    keep = (src_ids < n_s) & (tgt_ids < n_t)
    src_ids, tgt_ids = src_ids[keep], tgt_ids[keep]
    wider = max(src.dims.hidden, tgt.dims.hidden)
    if len(src_ids) * (HELD_OUT - 1) < wider * HELD_OUT:
        raise CrossLoraError(
            f"only {len(src_ids)} shared tokens between the two vocabularies; the anchored method "
            f"needs more than the wider hidden size ({wider}) after holding out 1 in {HELD_OUT}"
        )
    e_s, u_s = embeddings(src, src_ids)
    e_t, u_t = embeddings(tgt, tgt_ids)
    held = torch.arange(len(src_ids)) % HELD_OUT == 0
    to_src_e, d1 = ridge_cv(e_t, e_s, held)  # e_s ≈ R e_t (rows: x Rᵀ)
    to_tgt_e, d2 = ridge_cv(e_s, e_t, held)
    to_src_u, d3 = ridge_cv(u_s, u_t, held)  # ũ_t ≈ ũ_s R
    to_tgt_u, d4 = ridge_cv(u_t, u_s, held)
    diagnostics = {
        "shared_tokens": int(len(src_ids)),
        "embed_to_source": d1,
        "embed_to_target": d2,
        "unembed_to_source": d3,
        "unembed_to_target": d4,
    }
    return ResidualMaps(to_src_e.mT, to_tgt_e.mT, to_src_u, to_tgt_u, diagnostics)
