"""Where an adapter's residual-stream writers put their update (not a test).

For each PEFT adapter given, sums the energy of the `o_proj` and `down_proj` `lora_B` rows (one
row per residual-stream dimension) over all layers, and prints the dimensions that take the most
of it, with their shares, and the median over layers of the largest dimension's share:

    .venv/bin/python bench/dev/writer_dims.py adapters/qwen2.5-0.5b-commonsense OUT/...

An adapter trained on a model spreads its writes (the shipped adapters: at most 1 % per layer).
A transferred adapter that puts most of its update into one dimension did not get it from the
source adapter: it came from the residual-stream map (docs/results.md, eighth session).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from crosslora.io.peft_adapter import Adapter, read_adapter

WRITERS = ("o_proj", "down_proj")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def writer_energy(adapter: Adapter, role: str) -> dict[int, torch.Tensor]:
    """Per layer, the energy of each row of the role's ``lora_B`` (d,)."""
    return {
        int(LAYER.search(module).group(1)): adapter.factors(module).B.double().pow(2).sum(1)
        for module in adapter.modules
        if module.endswith(f".{role}")
    }


def main(adapters: list[str]) -> None:
    for name in adapters:
        print(name)
        adapter = read_adapter(Path(name))
        for role in WRITERS:
            per_layer = {k: e for k, e in writer_energy(adapter, role).items() if e.sum() > 0}
            if not per_layer:
                print(f"  {role}: no update")
                continue
            total = torch.stack(list(per_layer.values())).sum(0)
            share, dims = (total / total.sum()).sort(descending=True)
            top = ", ".join(f"{int(d)} {float(s):.3f}" for d, s in zip(dims[:4], share[:4]))
            largest = torch.tensor([float(e.max() / e.sum()) for e in per_layer.values()])
            print(
                f"  {role}: top dimensions (share of the energy over all layers) {top}; largest "
                f"dimension's share per layer, median {float(largest.median()):.3f}"
            )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
