"""Which source layer's update goes to which target layer.

- ``index`` (the paper's): layer i ↔ layer i; the deeper model's extra layers are unmatched.
- ``depth``: by relative depth, one to one. Layer i of the shallower model (n layers) is paired
  with layer ``floor(i · (N-1)/(n-1) + 1/2)`` of the deeper one (N layers), so first ↔ first and
  last ↔ last; the slope is ≥ 1, so no two layers collide. A deeper source loses the updates of
  its unpaired layers.
- ``merge``: by relative depth, every source layer: source layer i goes to target layer
  ``floor(i · (N_t-1)/(N_s-1) + 1/2)``. From a deeper source several layers land on one target
  layer; their updates add there (each layer's update is a residual-stream increment, so the
  sum is what the stack of layers contributed), and the sum is re-factorised to the adapter's
  rank (its best rank-r approximation, ``lora.refactor``). From a shallower or equally deep
  source it is ``depth``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from crosslora.errors import CrossLoraError

LAYER_MAPS = ("index", "depth", "merge")


@dataclass(frozen=True)
class LayerMap:
    kind: str
    src_layers: int
    tgt_layers: int
    pairs: dict[int, int]  # source layer -> target layer (several may share one: ``merge``)

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
    elif kind == "merge" and src_layers > tgt_layers:
        pairs = {i: _nearest(i, src_layers, tgt_layers) for i in range(src_layers)}
    elif kind == "merge":
        pairs = _by_depth(src_layers, tgt_layers)
    else:
        raise CrossLoraError(f"unknown layer map {kind!r}; choose from {', '.join(LAYER_MAPS)}")
    return LayerMap(kind, src_layers, tgt_layers, pairs)


def _nearest(i: int, n_src: int, n_tgt: int) -> int:
    return math.floor(i * (n_tgt - 1) / max(n_src - 1, 1) + 0.5)


def _by_depth(n_src: int, n_tgt: int) -> dict[int, int]:
    shallow, deep = min(n_src, n_tgt), max(n_src, n_tgt)
    if shallow == 1:
        matched = {0: (deep - 1) // 2}
    else:
        matched = {i: _nearest(i, shallow, deep) for i in range(shallow)}
    return matched if n_src <= n_tgt else {j: i for i, j in matched.items()}


def ranges(xs: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, start = [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)
