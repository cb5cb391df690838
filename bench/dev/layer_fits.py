"""How well each target layer can read what each source layer's adapter reads (not a test).

Runs `matched`'s preparation (probe text, both models' activations), then for every source layer,
every target layer and each input space fits, as the method does, the target's reproduction of
the adapter's input features (`A_s x_s`, the rows of every role reading that space stacked) on
3/4 of the probe positions, and prints the relative residual on the other 1/4 (every fourth probe
text) for the layer the `depth`/`merge` maps choose and for the best target layer:

    .venv/bin/python bench/dev/layer_fits.py smollm2-135m gemma3-270m \\
        adapters/smollm2-135m-commonsense          # model names from `crosslora models pull`

A residual of 1 is no better than predicting zero. If the best layer is much better than the
depth map's, the layer map is losing the adapter; if every layer is poor, the space is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import crosslora.methods.matched as mm
from crosslora.arch.layout import Layout
from crosslora.io.checkpoint import Checkpoint
from crosslora.io.peft_adapter import read_adapter
from crosslora.layer_map import map_layers

SPACES = {"attn_in": ("q", "k", "v"), "mlp_in": ("gate", "up"), "attn_out": ("o",),
          "mlp_mid": ("down",)}  # fmt: skip


def main(src_name: str, tgt_name: str, adapter_dir: str) -> None:
    torch.set_grad_enabled(False)
    models = Path.home() / ".cache/crosslora/models"
    src = Layout(Checkpoint(str(models / src_name), "source model"), "source model")
    tgt = Layout(Checkpoint(str(models / tgt_name), "target model"), "target model")
    adapter = read_adapter(Path(adapter_dir))
    a_rows: dict[tuple[int, str], list[torch.Tensor]] = {}
    for ref in src.roles():
        if ref.slot.module in adapter.modules:
            a = adapter.factors(ref.slot.module).A.float()
            a_rows.setdefault((ref.layer, ref.role), []).append(a)
    positions: list[list[int]] = []  # per probe text, its aligned positions (source side)
    collect = mm.collect

    def recording(model, layout, batch, pad_id):
        if not positions:
            positions.extend(batch.positions)
        return collect(model, layout, batch, pad_id)

    mm.collect = recording
    method = mm.Matched()
    method.prepare(src, tgt, torch.device("cpu"))
    acts_s, acts_t = method.acts_s, method.acts_t
    held = torch.tensor([j % 4 == 3 for j, p in enumerate(positions) for _ in p])
    ns, nt = src.num_layers, tgt.num_layers
    nearest = map_layers("merge", ns, nt)  # every source layer to the nearest relative depth
    for space, roles in SPACES.items():
        feats = {}
        for ls in range(ns):
            rows = [a for r in roles for a in a_rows.get((ls, r), [])]
            if rows:
                feats[ls] = acts_s.inputs[(ls, space)].double() @ torch.cat(rows).double().mT
        if not feats:
            continue
        res = torch.full((ns, nt), float("nan"))
        for lt in range(nt):
            x = acts_t.inputs[(lt, space)]
            ridge = mm.Ridge(x[~held])
            for ls, f in feats.items():
                w = ridge.solve(x[~held].double().mT @ f[~held])
                res[ls, lt] = float((x[held].double() @ w - f[held]).norm() / f[held].norm())
        depth = torch.tensor([res[i, nearest.pairs[i]] for i in feats])
        best = res[list(feats)].min(dim=1)
        worse = int((depth >= 1).sum())
        print(
            f"{space}: held-out relative residual, depth map mean {depth.mean():.3f}, best target "
            f"layer mean {best.values.mean():.3f}; at or above 1 (no better than zero) under the "
            f"depth map: {worse} of {len(depth)} source layers"
        )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
