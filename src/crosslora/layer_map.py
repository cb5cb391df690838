"""Which source layer's update goes to which target layer.

Both rules give a partial one-to-one matching: every layer of the shallower model is paired with
one distinct layer of the deeper one, and the rest are reported as unmatched.

- ``index`` (the paper's): layer i ↔ layer i; the deeper model's extra layers are unmatched.
- ``depth``: by relative depth. Layer i of the shallower model (n layers) is paired with layer
  ``floor(i · (N-1)/(n-1) + 1/2)`` of the deeper one (N layers), so first ↔ first and
  last ↔ last; the slope is ≥ 1, so no two layers collide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crosslora.errors import CrossLoraError

LAYER_MAPS = ("index", "depth")


@dataclass(frozen=True)
class LayerMap:
    kind: str
    src_layers: int
    tgt_layers: int
    pairs: dict[int, int]  # source layer -> target layer

    @property
    def unmatched_src(self) -> list[int]:
        return [i for i in range(self.src_layers) if i not in self.pairs]

    @property
    def unmatched_tgt(self) -> list[int]:
        hit = set(self.pairs.values())
        return [j for j in range(self.tgt_layers) if j not in hit]


def map_layers(kind: str, src_layers: int, tgt_layers: int) -> LayerMap:
    if kind == "index":
        pairs = {i: i for i in range(min(src_layers, tgt_layers))}
    elif kind == "depth":
        pairs = _by_depth(src_layers, tgt_layers)
    else:
        raise CrossLoraError(f"unknown layer map {kind!r}; choose from {', '.join(LAYER_MAPS)}")
    return LayerMap(kind, src_layers, tgt_layers, pairs)


def _by_depth(n_src: int, n_tgt: int) -> dict[int, int]:
    shallow, deep = min(n_src, n_tgt), max(n_src, n_tgt)
    if shallow == 1:
        matched = {0: (deep - 1) // 2}
    else:
        matched = {i: math.floor(i * (deep - 1) / (shallow - 1) + 0.5) for i in range(shallow)}
    return matched if n_src <= n_tgt else {j: i for i, j in matched.items()}
