"""What ``matched``'s maps see between two base models, before any adapter: how well each map
that a transfer would fit predicts the other model on probe text it was not fitted on.

The probe's texts are split in two (even and odd); every map is fitted on one half as the
method fits it and scored on the other, as a quality ``1 − ‖fit − want‖ / ‖want‖`` (1: exact,
0: nothing carried; negative clipped to 0). Per layer pair of the layer map:

- ``read`` (per input space): the target's inputs reproduce 16 random features of the
  source's (what ``lora_A``'s ridge regression does with the adapter's own features);
- ``neurons``: the source's MLP neurons reproduce 16 random directions of the target's (the
  gate/up output map);
- ``stream``: the scaled isometry between the residual streams after the layers (the o/down
  write map).

Held out, because in sample a ridge over a few thousand positions fits a wide space well
whatever it carries (docs/methods.md, "matched"). Shapes: activations (N, n) as in ``probe``.
"""

from __future__ import annotations

import torch

from crosslora.layer_map import LayerMap
from crosslora.methods.matched.fits import Ridge, procrustes, rel
from crosslora.methods.matched.probe import Activations

FEATURES = 16  # random features or directions scored per map


def halves(rows_per_text: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe rows of the even texts and of the odd ones (index tensors)."""
    text = torch.repeat_interleave(torch.arange(len(rows_per_text)), torch.tensor(rows_per_text))
    even = (text % 2 == 0).nonzero().squeeze(1)
    odd = (text % 2 == 1).nonzero().squeeze(1)
    return even.to(device), odd.to(device)


def quality(residual: float) -> float:
    return round(max(0.0, 1.0 - residual), 4)


def ridge_quality(x: torch.Tensor, want: torch.Tensor, fit: torch.Tensor, held: torch.Tensor,
                  alpha: float) -> float:  # fmt: skip
    """``want`` (N, k) from ``x`` (N, n) by ridge regression on rows ``fit``, scored on ``held``."""
    ridge = Ridge(x[fit], alpha)
    coef = ridge.solve(x[fit].double().mT @ want[fit].double())  # (n, k)
    return quality(rel(x[held].double() @ coef, want[held].double()))


def stream_quality(h_s: torch.Tensor, h_t: torch.Tensor, fit: torch.Tensor,
                   held: torch.Tensor) -> float:  # fmt: skip
    """The residual-stream isometry fitted on rows ``fit``, scored on ``held``."""
    m, _ = procrustes(h_s[fit], h_t[fit])  # (m_t, m_s)
    return quality(rel(h_s[held].double() @ m.mT, h_t[held].double()))


def features(width: int, seed: int, device: torch.device) -> torch.Tensor:
    """``FEATURES`` random unit directions of a ``width``-wide space (width, k), float64."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(width, FEATURES, dtype=torch.float64, generator=gen)
    return (d / d.norm(dim=0)).to(device)


def layer_sight(acts_s: Activations, acts_t: Activations, ls: int, lt: int, depth: tuple[int, int],
                spaces: list[str], rows: tuple[torch.Tensor, torch.Tensor], alpha: float,
                device: torch.device) -> dict[str, float]:  # fmt: skip
    """The held-out qualities of one layer pair's maps (the module docstring's names)."""
    fit, held = rows
    out: dict[str, float] = {}
    for space in spaces:
        x_s = acts_s.inputs[(ls, space)].to(device)
        x_t = acts_t.inputs[(lt, space)].to(device)
        want = x_s.double() @ features(x_s.shape[1], ls, device)
        out[f"read_{space}"] = ridge_quality(x_t, want, fit, held, alpha)
        if space == "mlp_mid":
            want = x_t.double() @ features(x_t.shape[1], lt, device)
            out["neurons"] = ridge_quality(x_s, want, fit, held, alpha)
    after = (min(ls + 1, depth[0] - 1), min(lt + 1, depth[1] - 1))
    out["stream"] = stream_quality(acts_s.residual[after[0]].to(device),
                                   acts_t.residual[after[1]].to(device), fit, held)  # fmt: skip
    return out


def sight(acts_s: Activations, acts_t: Activations, lmap: LayerMap, spaces: list[str],
          rows_per_text: list[int], alpha: float, device: torch.device,
          progress=None) -> list[dict]:  # fmt: skip
    """Every layer pair's qualities, ``{"layer": [ls, lt], <map>: quality, ...}``, in layer
    order; ``progress`` (an iterable wrapper, such as tqdm) shows them go by."""
    rows = halves(rows_per_text, device)
    pairs = sorted(lmap.pairs.items())
    out = []
    for ls, lt in progress(pairs) if progress else pairs:
        q = layer_sight(acts_s, acts_t, ls, lt, (lmap.src_layers, lmap.tgt_layers), spaces,
                        rows, alpha, device)  # fmt: skip
        out.append({"layer": [ls, lt], **q})
    return out
