"""What ``matched`` holds, in bytes, for the plan's estimate (``Matched.memory``) and for choosing
how the probe text is sampled (``sampling.sampler``)."""

from __future__ import annotations

import math
import re

from crosslora.arch.layout import Layout
from crosslora.memory import parameter_bytes, stored_bytes
from crosslora.methods.matched.params import MatchedParams
from crosslora.methods.matched.probe import INPUT_SPACE, input_widths

RUNTIME_BYTES = 1 << 30  # torch, the tokenizers, the forward passes: what `memory` does not count


def shares(layout: Layout, p: MatchedParams) -> dict[str, int]:
    """A model's parts in bytes: as stored; its largest decoder layer, and everything outside its
    layers, in float32; what sampling 16 texts holds, whole (the model as stored) or one layer at
    a time (its parts outside the layers and a layer, as stored), with the key/value cache; and
    the float32 bytes per position of a layer's hidden state and widest intermediate
    (``width``)."""
    ckpt = layout.checkpoint
    leaf = re.escape(layout.family.layers.split(".")[-1])
    pattern = re.compile(rf"(?:^|\.){leaf}\.(\d+)\.")
    per_layer: dict[int, int] = {}
    for key in ckpt.keys():
        m = pattern.search(key)
        if m:
            i = int(m.group(1))
            per_layer[i] = per_layer.get(i, 0) + 4 * math.prod(ckpt.shape(key))
    stored, f32 = stored_bytes(ckpt), parameter_bytes(ckpt)
    d = layout.dims
    per_value = stored / max(1, f32 // 4)  # bytes per value as stored
    kv = int(16 * (p.text_tokens + 1) * d.layers * 2 * d.kv_heads * d.head_dim * per_value)
    layer, outside = max(per_layer.values(), default=0), f32 - sum(per_layer.values())
    return {"stored": stored, "layer": layer, "outside": outside,
            "sampling_whole": stored + kv,
            "sampling_by_layer": int((outside + 2 * layer) * per_value / 4) + kv,
            "width": d.hidden + max(d.hidden, d.intermediate)}  # fmt: skip


def fit_bytes(src: Layout, tgt: Layout) -> int:
    """The float64 fits ``_fit`` holds at their peak: a target layer's ridge factors for every
    input space it reads, while the widest of them is factorised (its Gram matrix beside its
    factor), or, before that one is made, the others while the source's MLP-neuron ridge is
    factorised (its Gram and factor); from a deeper source, whose later layers reach a target
    layer whose ridges are all made, all of them while it is; and the writers' two maps."""

    def widths(layout: Layout, spaces: set[str]) -> list[list[int]]:
        per_layer: list[list[int]] = [[] for _ in range(layout.num_layers)]
        for (layer, space), n in input_widths(layout).items():
            if space in spaces:
                per_layer[layer].append(n)
        return per_layer

    mid = max((n for ns in widths(src, {"mlp_mid"}) for n in ns), default=0)
    peak, deeper = 0, src.num_layers > tgt.num_layers
    for ns in widths(tgt, set(INPUT_SPACE.values())):
        held, widest = sum(n * n for n in ns), max(ns, default=0) ** 2
        peak = max(peak, held + widest, held - (0 if deeper else widest) + 2 * mid * mid)
    return 8 * (peak + 2 * src.dims.hidden * tgt.dims.hidden)


def kept_fit_bytes(src: Layout, tgt: Layout) -> int:
    """What the fits kept in the pair cache take on disk (float64, every layer): the target's
    ridge factors for its input spaces, the source's for its MLP neurons and for each q, k, v
    output, and two residual-stream maps per source layer."""
    t = sum(n * n for (_, space), n in input_widths(tgt).items())
    s = sum(n * n for (_, space), n in input_widths(src).items() if space == "mlp_mid")
    outs = sum(ref.shape[0] ** 2 for ref in src.roles() if ref.role in ("q", "k", "v"))
    maps = 2 * src.num_layers * src.dims.hidden * tgt.dims.hidden
    return 8 * (t + s + outs + maps)
