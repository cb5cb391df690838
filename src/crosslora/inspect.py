"""What the anchored alignment sees between two base models, before any transfer.

For every matched layer pair and role: how much of the target's (effective) weight the mapped
source weight explains, ``quality = 1 − ‖W̃_t − map(W̃_s)‖ / ‖W̃_t‖`` (1: the same module in other
coordinates; 0: nothing in common). Plus the shared vocabulary and the residual-map fits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from crosslora.arch.layout import ROLES, Layout
from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import Checkpoint
from crosslora.layer_map import map_layers
from crosslora.methods.anchored import alignment

ANCHOR_FITS = ("embed_to_source", "embed_to_target", "unembed_to_source", "unembed_to_target")


def inspect_pair(
    source: str, target: str, layer_map: str = "depth", device: torch.device | None = None,
    progress: bool = True,
) -> dict:  # fmt: skip
    device = device or torch.device("cpu")
    src = Layout(Checkpoint(source, "source model"), "source model")
    tgt = Layout(Checkpoint(target, "target model"), "target model")
    lmap = map_layers(layer_map, src.num_layers, tgt.num_layers)
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
        "source_model": source,
        "target_model": target,
        "source_family": src.checkpoint.model_type,
        "target_family": tgt.checkpoint.model_type,
        "layer_map": {
            "kind": lmap.kind,
            "pairs": {str(i): j for i, j in sorted(lmap.pairs.items())},
            "unmatched_source_layers": lmap.unmatched_src,
            "unmatched_target_layers": lmap.unmatched_tgt,
        },  # fmt: skip
        "anchors": anchors,
        "per_role": {r: round(sum(v) / len(v), 4) for r, v in by_role.items() if v},
        "modules": modules,
    }


def format_summary(result: dict) -> str:
    a = result["anchors"]
    lines = [
        f"{result['source_model']} ({result['source_family']}) -> "
        f"{result['target_model']} ({result['target_family']})",
        f"shared vocabulary: {a['shared_tokens']} tokens "
        f"(of {a['source_vocab']} source, {a['target_vocab']} target)",
        "residual maps, held-out relative residual (0 = exact): "
        + ", ".join(f"{k} {a[k]['heldout_residual']:.3f}" for k in ANCHOR_FITS),
        f"layer map: {result['layer_map']['kind']}, {len(result['layer_map']['pairs'])} pairs",
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


def check_png_path(path: Path) -> str:
    """The image format ``path`` names (its extension; none: png), checked before any work:
    matplotlib must be installed and able to write it."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as err:
        raise CrossLoraError("--png needs matplotlib: pip install 'crosslora[plot]'") from err
    fmt = path.suffix.removeprefix(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise CrossLoraError(
            f"--png {path}: matplotlib cannot write .{fmt} files (use .png, or one of "
            f"{', '.join(sorted(formats))})"
        )
    return fmt


def plot_heatmap(result: dict, path: Path, fmt: str | None = None) -> None:
    """The heatmap, written to ``path`` (as ``fmt``, else as its extension says)."""
    try:
        import matplotlib
    except ImportError as err:
        raise CrossLoraError("--png needs matplotlib: pip install 'crosslora[plot]'") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({tuple(m["layer"]) for m in result["modules"]})
    grid = torch.full((len(ROLES), len(pairs)), float("nan"))
    for m in result["modules"]:
        grid[ROLES.index(m["role"]), pairs.index(tuple(m["layer"]))] = m["quality"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(pairs) + 2), 3.6))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(ROLES)), ROLES)
    ax.set_xticks(range(len(pairs)), [f"{s}→{t}" for s, t in pairs], rotation=90, fontsize=7)
    ax.set_xlabel("source layer → target layer")
    ax.set_title(f"alignment quality: {result['source_family']} → {result['target_family']} "
                 f"({result['anchors']['shared_tokens']} shared tokens)", fontsize=9)  # fmt: skip
    fig.colorbar(im, ax=ax, label="1 − fit residual")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format=fmt)
    finally:
        plt.close(fig)
