"""What the anchored alignment sees between two base models, before any transfer (``inspect
--method anchored``).

For every matched layer pair and role: how much of the target's (effective) weight the mapped
source weight explains, ``quality = 1 − ‖W̃_t − map(W̃_s)‖ / ‖W̃_t‖`` (1: the same module in other
coordinates; 0: nothing in common). Plus the shared vocabulary and the residual-map fits.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from crosslora.arch.layout import ROLES, Layout
from crosslora.layer_map import LayerMap
from crosslora.methods.anchored import alignment

ANCHOR_FITS = ("embed_to_source", "embed_to_target", "unembed_to_source", "unembed_to_target")


def inspect_anchored(src: Layout, tgt: Layout, lmap: LayerMap, device: torch.device,
                     progress: bool = True) -> dict:  # fmt: skip
    """The anchors and every layer pair's and role's alignment quality (the module docstring)."""
    pairs = [(ls, lt, role) for ls, lt in sorted(lmap.pairs.items()) for role in ROLES
             if src.role(ls, role) is not None and tgt.role(lt, role) is not None]  # fmt: skip
    anchors, fits = alignment(src, tgt, pairs, device)
    modules = [
        {"layer": [ls, lt], "role": role, "quality": round(max(0.0, 1 - fit), 4)}
        for (ls, lt, role), fit in zip(pairs, tqdm(fits, total=len(pairs), desc="inspect",
                                                   unit="module", disable=not progress))
    ]  # fmt: skip
    by_role = {r: [m["quality"] for m in modules if m["role"] == r] for r in ROLES}
    return {
        "anchors": anchors,
        "per_role": {r: round(sum(v) / len(v), 4) for r, v in by_role.items() if v},
        "modules": modules,
    }


def format_anchored(result: dict) -> str:
    """The anchored part of ``inspect``'s printout."""
    a = result["anchors"]
    lines = [
        f"shared vocabulary: {a['shared_tokens']} tokens "
        f"(of {a['source_vocab']} source, {a['target_vocab']} target)",
        "residual maps, held-out relative residual (0 = exact): "
        + ", ".join(f"{k} {a[k]['heldout_residual']:.3f}" for k in ANCHOR_FITS),
        "alignment quality (1 = same module in other coordinates, 0 = nothing shared):",
        "  layer      " + " ".join(f"{r:>6}" for r in ROLES),
    ]  # fmt: skip
    table: dict[tuple[int, int], dict[str, float]] = {}
    for m in result["modules"]:
        table.setdefault(tuple(m["layer"]), {})[m["role"]] = m["quality"]
    for (ls, lt), row in table.items():
        cells = " ".join(f"{row[r]:6.3f}" if r in row else "     -" for r in ROLES)
        lines.append(f"  {ls:>3} -> {lt:<3} {cells}")
    means = result["per_role"]
    lines.append(
        "  mean       " + " ".join(f"{means[r]:6.3f}" if r in means else "     -" for r in ROLES)
    )
    return "\n".join(lines)
