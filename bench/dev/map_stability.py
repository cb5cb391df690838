"""How much of the writers' residual-stream map is set by the probe text it happens to see (not a
test).

Samples N probe texts (half from each model, as `matched` does, with another seed), keeps both
models' residual streams at the aligned positions and fits `matched`'s Procrustes map between the
streams after each source layer and its target layer (`merge` map; plain residual coordinates,
so pairs with Gemma's post-norms are not what the method fits) three times: on the texts ≡ 0 and
≡ 1 (mod 4), two disjoint quarters, and on all texts but the second quarter. It prints the cosine
between what two maps make of the adapter's o and down `lora_B` columns (Frobenius, all columns of
a layer together), of 32 random directions, and of the source stream's 32 leading principal
directions:

    .venv/bin/python bench/dev/map_stability.py qwen2.5-0.5b smollm2-135m \\
        adapters/qwen2.5-0.5b-commonsense 128         # model names from `crosslora models pull`

Two maps that agree give 1. Where the adapter's columns agree no better than random directions,
the map's direction for them is set by the sample, not by the two models.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from fresh_probe import fresh_probe, layouts

import crosslora.methods.matched as mm
from crosslora.io.peft_adapter import read_adapter
from crosslora.layer_map import map_layers


def cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u * v).sum() / (u.norm() * v.norm()))


def main(src_name: str, tgt_name: str, adapter_dir: str, n_texts: str) -> None:
    src, tgt = layouts(src_name, tgt_name)
    adapter = read_adapter(Path(adapter_dir))
    columns: dict[int, list[torch.Tensor]] = {}
    for ref in src.roles():
        if ref.role in ("o", "down") and ref.slot.module in adapter.modules:
            columns.setdefault(ref.layer, []).append(adapter.factors(ref.slot.module).B.double())
    texts, text_of, acts_s, acts_t = fresh_probe(src, tgt, int(n_texts), ())  # streams only
    first, second, most = text_of % 4 == 0, text_of % 4 == 1, text_of % 4 != 1
    print(f"{len(texts)} texts, {len(text_of)} aligned positions; quarters of "
          f"{int(first.sum())} and {int(second.sum())}, the rest {int(most.sum())}")  # fmt: skip
    pairs = map_layers("merge", src.num_layers, tgt.num_layers).pairs
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ls, cols in sorted(columns.items()):
        lt = pairs[ls]
        h_s = acts_s.residual[min(ls + 1, src.num_layers - 1)]
        h_t = acts_t.residual[min(lt + 1, tgt.num_layers - 1)]
        m1, m2, m3 = (mm.procrustes(h_s[rows_], h_t[rows_])[0] for rows_ in (first, second, most))
        b = torch.cat(cols, 1)
        rand = torch.randn(b.shape[0], 32, generator=gen, dtype=torch.float64)
        lead = torch.linalg.svd(h_s.double(), full_matrices=False)[2][:32].mT
        rows.append((cos(m1 @ b, m2 @ b), cos(m1 @ b, m3 @ b), cos(m1 @ rand, m2 @ rand),
                     cos(m1 @ lead, m2 @ lead)))  # fmt: skip
        print(
            f"layer {ls:2d} -> {lt:2d}: adapter's columns {rows[-1][0]:.3f} (against the "
            f"rest: {rows[-1][1]:.3f}), random {rows[-1][2]:.3f}, leading {rows[-1][3]:.3f}"
        )
    mean = [statistics.mean(r[i] for r in rows) for i in range(4)]
    print(f"mean: adapter's columns {mean[0]:.3f} (against the rest: {mean[1]:.3f}), "
          f"random {mean[2]:.3f}, leading {mean[3]:.3f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
