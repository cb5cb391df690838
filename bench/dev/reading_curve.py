"""How the target's reading of the writers' input features improves with more probe text (not a
test).

Samples N probe texts (half from each model, as `matched` does, with another seed), keeps both
models' o and down inputs at the aligned positions, and fits `matched`'s input regression (the
target's reproduction of the adapter's input features `A_s x_s`, each source layer against its
target layer under the `merge` map) on 1/8, 1/4, 1/2 and all of the texts that are not held out,
and scores it on every fourth text. It prints the held-out relative residual of the features, and
of their input-dependent part (both sides centred on the held-out mean), averaged over layers:

    .venv/bin/python bench/dev/reading_curve.py smollm2-135m gemma3-270m \\
        adapters/smollm2-135m-commonsense 256         # model names from `crosslora models pull`

A residual of 1 is no better than predicting zero (or, centred, than predicting the mean).
At 256 texts this pair used about 18 GB of memory (both models and the activations).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fresh_probe import fresh_probe, layouts

import crosslora.methods.matched as mm
from crosslora.anchor import probe
from crosslora.io.peft_adapter import read_adapter
from crosslora.layer_map import map_layers

SPACES = {"attn_out": "o", "mlp_mid": "down"}


def main(src_name: str, tgt_name: str, adapter_dir: str, n_texts: str) -> None:
    src, tgt = layouts(src_name, tgt_name)
    adapter = read_adapter(Path(adapter_dir))
    a_of = {(ref.layer, probe.INPUT_SPACE[ref.role]): adapter.factors(ref.slot.module).A.float()
            for ref in src.roles()
            if ref.role in SPACES.values() and ref.slot.module in adapter.modules}  # fmt: skip
    # the writers' inputs only: the rest would not fit in memory
    texts, text_of, acts_s, acts_t = fresh_probe(src, tgt, int(n_texts), SPACES)
    held = text_of % 4 == 3
    rest = [j for j in range(len(texts)) if j % 4 != 3]  # both models' texts, in order
    pairs = map_layers("merge", src.num_layers, tgt.num_layers).pairs
    print(f"{len(texts)} texts, {len(text_of)} aligned positions, {int(held.sum())} held out")
    for space in SPACES:
        for step in (8, 4, 2, 1):  # every step-th text of the rest: both models' texts
            fit = torch.isin(text_of, torch.tensor(rest[::step]))
            whole, centred = [], []
            for (ls, sp), a in sorted(a_of.items()):
                if sp != space:
                    continue
                feats = acts_s.inputs[(ls, space)].double() @ a.double().mT
                x = acts_t.inputs[(pairs[ls], space)]
                w = mm.Ridge(x[fit]).solve(x[fit].double().mT @ feats[fit])
                err = x[held].double() @ w - feats[held]
                want = feats[held]
                whole.append(float(err.norm() / want.norm()))
                centred.append(float((err - err.mean(0)).norm() / (want - want.mean(0)).norm()))
            print(f"{space} ({SPACES[space]}), fitted on {int(fit.sum())} positions: held-out "
                  f"relative residual {sum(whole) / len(whole):.3f}, input-dependent part "
                  f"{sum(centred) / len(centred):.3f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
