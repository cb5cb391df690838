"""In-sample against held-out fit of `matched`'s output maps, for one model pair (not a test).

Runs `matched`'s preparation (probe text, both models' activations), then for four target layers
(0, 1/3, 2/3 and the end of depth, each with its source layer by relative depth) fits the
MLP-neuron map (what gate/up updates go through) and the residual-stream map (o/down) the way
the method does, on 3/4 of the probe positions, and prints the relative residual on those
positions and on the other 1/4 (every fourth run of 96 positions, about one probe text each, so
both models' texts are in both parts):

    .venv/bin/python bench/dev/holdout_fits.py qwen2.5-0.5b gemma3-270m   # names from `models pull`
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import crosslora.methods.matched as mm
from crosslora.arch.layout import Layout
from crosslora.io.checkpoint import Checkpoint


def fit(y_s: torch.Tensor, y_t: torch.Tensor) -> tuple[float, float]:
    """Relative residual of the ridge map y_s -> y_t (16 random target directions), fitted on
    3/4 of the rows: (in sample, held out)."""
    held = (torch.arange(y_s.shape[0]) // 96) % 4 == 3
    fitted = ~held
    ridge = mm.Ridge(y_s[fitted])
    probe = torch.randn(y_t.shape[1], 16, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    want = y_t.double() @ probe
    pred = y_s.double() @ ridge.solve(y_s[fitted].double().mT @ want[fitted])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return rel(pred[fitted], want[fitted]), rel(pred[held], want[held])


def main() -> None:
    models = Path.home() / ".cache/crosslora/models"
    src = Layout(Checkpoint(str(models / sys.argv[1]), "source model"), "source model")
    tgt = Layout(Checkpoint(str(models / sys.argv[2]), "target model"), "target model")
    method = mm.Matched()
    method.prepare(src, tgt, torch.device("cpu"))
    acts_s, acts_t = method.acts_s, method.acts_t
    ns, nt = src.num_layers, tgt.num_layers
    for lt in (0, nt // 3, 2 * nt // 3, nt - 1):
        ls = min(ns - 1, round(lt * (ns - 1) / max(nt - 1, 1)))
        mid = fit(acts_s.inputs[(ls, "mlp_mid")], acts_t.inputs[(lt, "mlp_mid")])
        res = fit(acts_s.residual[min(ls + 1, ns - 1)], acts_t.residual[min(lt + 1, nt - 1)])
        line = f"layers {ls}->{lt}: MLP-neuron map in sample {mid[0]:.2f}, held out {mid[1]:.2f}"
        print(f"{line} | residual map in sample {res[0]:.2f}, held out {res[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
