"""Size the transferred update by what it does to the models' predictions on the probe text.

Between two consecutive aligned boundaries both models predict the same piece of text, a
*chunk*, so a chunk's log-likelihood is a number both define. The source adapter's effect is
``d_s`` (C,), the changes it makes to the source's chunk log-likelihoods; the transfer's is
``full`` (C,) on the target, and each role's part ``slopes`` (R, C) is what is lost when that role
alone is left out. Per-role scales ``c`` (R,) ≥ 0 solve ``min ‖full + slopesᵀ (c − 1) − d_s‖``
(``fit_scales``), then all are multiplied by ``ρ^(-1/2)`` for the least-squares attenuation
(``disattenuation``). On an exact transfer every factor is 1. The reasoning (an
errors-in-variables reading) and the measurements are in docs/methods.md, "Calibration by
function".
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from crosslora.hooks import Update, applied
from crosslora.methods.matched.probe import ProbeBatch
from crosslora.methods.matched.stream import Streamed, run_layers
from crosslora.padding import right_padded


def chunk_logliks(
    run: Streamed, batch: ProbeBatch, pad_id: int, variants: Sequence[Sequence[Update]],
    chunk: int = 4, bar=None,
) -> list[torch.Tensor]:  # fmt: skip
    """The log-likelihood of every chunk of the probe text between consecutive aligned positions,
    (C,) float64 in text order, under the model (``run``, one layer at a time) with each
    variant's updates applied: one sweep through the layers for all variants (``bar``, a tqdm
    bar, advanced per layer)."""
    chunks = [right_padded(batch.ids[lo : lo + chunk], pad_id)
              for lo in range(0, len(batch.ids), chunk)]  # fmt: skip
    prefix = run.layout.family.layers
    per_layer = [[[u for u in updates if u.module.startswith(f"{prefix}.{i}.")]
                  for i in range(run.n)] for updates in variants]  # fmt: skip

    def around(i: int, v: int, _c: int):
        return applied(run.skeleton, per_layer[v][i]) if per_layer[v][i] else None

    states = run_layers(run, chunks, len(variants), around, bar=bar)
    out = []
    for last in states:
        lls = []
        for c, (ids, mask) in enumerate(chunks):
            logits = run.logits(ids, mask, last[c]).float()
            last[c] = None  # freed as it goes
            ids = ids.to(logits.device)
            # tok[j, i] = log p(ids[j, i + 1] | ids[j, :i + 1])
            tok = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] - logits[:, :-1].logsumexp(-1)
            del logits
            cum = torch.cat([tok.new_zeros(len(ids), 1), tok.double().cumsum(1)], dim=1).cpu()
            for j, pos in enumerate(batch.positions[c * chunk : (c + 1) * chunk]):
                p = torch.tensor(pos, dtype=torch.long)
                lls.append(cum[j, p[1:]] - cum[j, p[:-1]])  # tokens p_k + 1 .. p_{k+1}
        out.append(torch.cat(lls))
    return out


def nonnegative_lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``argmin_{c ≥ 0} ‖x c − y‖`` for ``x`` (C, R) with few columns, exactly: the best
    unconstrained solution over every subset of columns whose solution is non-negative."""
    x, y = x.double(), y.double()
    r = x.shape[1]
    gram, rhs = x.mT @ x, x.mT @ y
    best, best_loss = torch.zeros(r, dtype=torch.float64), float(y @ y)
    for k in range(1, r + 1):
        for cols in itertools.combinations(range(r), k):
            idx = torch.tensor(cols)
            g = gram[idx][:, idx]
            sol = torch.linalg.lstsq(g, rhs[idx]).solution
            if (sol < 0).any():
                continue
            loss = float(y @ y - 2 * sol @ rhs[idx] + sol @ g @ sol)
            if loss < best_loss - 1e-12 * float(y @ y):
                best, best_loss = torch.zeros(r, dtype=torch.float64), loss
                best[idx] = sol
    return best


def fit_scales(d_s: torch.Tensor, full: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Per-role scales ``c`` (R,) ≥ 0 for the target's update, from its chunk effects.

    ``full`` (C,) is the effect of the whole transferred update (every scale 1) and ``slopes``
    (R, C) each role's part of it (``full`` minus the effect without that role). Linear around
    ``c = 1``: ``effect(c) ≈ full + slopesᵀ (c − 1)``, fitted to the source's ``d_s`` (C,) by
    non-negative least squares. Where the transfer is exact (``full = d_s``) every scale is 1.
    Roles with no measurable part keep scale 1.
    """
    live = slopes.norm(dim=1) > 1e-9 * float(d_s.norm().clamp_min(1e-30))
    scales = torch.ones(len(slopes), dtype=torch.float64)
    if live.any():
        x = slopes[live].double().mT
        scales[live] = nonnegative_lstsq(x, (d_s - full).double() + x.sum(dim=1))
    return scales


def disattenuation(corr: float) -> float:
    """The factor ``ρ^(-1/2)`` on every least-squares scale, ``ρ`` the correlation of the
    calibrated transfer's chunk effects with the source's: the least-squares size times this is
    the geometric mean of the least-squares and reduced-major-axis sizes (module docstring). 1 where
    the transfer is exact (``ρ = 1``) or tracks nothing (``ρ ≤ 0``, nothing to correct)."""
    return corr**-0.5 if 0.0 < corr < 1.0 else 1.0


def agreement(d_s: torch.Tensor, d_t: torch.Tensor) -> dict[str, float]:
    """How well the target's chunk effects ``d_t`` reproduce the source's ``d_s``: their
    correlation, and the fraction of ``‖d_s‖²`` explained (1: identical; ≤ 0: none)."""
    a, b = d_s - d_s.mean(), d_t - d_t.mean()
    corr = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
    explained = 1.0 - float((d_s - d_t).pow(2).sum() / d_s.pow(2).sum().clamp_min(1e-30))
    return {"corr": round(corr, 4), "explained": round(explained, 4)}
