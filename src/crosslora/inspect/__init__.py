"""``crosslora inspect``: what a method sees between two base models, before any transfer, and
what that has meant on the benchmark.

- ``matched`` (the default method): its probe text and the held-out quality of its maps per layer
  pair (``inspect.matched``), with the odds the benchmark's pairs give (``inspect.odds``);
- ``anchored``: its anchors and the alignment quality of every module (``inspect.anchored``);
- every method: its layer map and what the benchmark measured for it (``methods.expectation``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from crosslora.arch.layout import ROLES, Layout
from crosslora.errors import CrossLoraError
from crosslora.inspect.anchored import format_anchored, inspect_anchored
from crosslora.inspect.matched import MAPS, format_matched, inspect_matched
from crosslora.inspect.odds import odds
from crosslora.io.checkpoint import Checkpoint
from crosslora.layer_map import map_layers
from crosslora.methods import METHODS, expectation
from crosslora.pair_cache import default_pair_dir

VIEWS = ("matched", "anchored")  # the methods whose view inspect measures


def inspect_pair(
    source: str, target: str, method: str = "matched", layer_map: str | None = None,
    device: torch.device | None = None, pair_dir: Path | None = None, progress: bool = True,
) -> dict:  # fmt: skip
    """What ``method`` sees between the base models ``source`` and ``target`` (paths or hub
    ids), as JSON-ready data; ``pair_dir``: the pair cache (matched), default the user's."""
    device = device or torch.device("cpu")
    src = Layout(Checkpoint(source, "source model"), "source model")
    tgt = Layout(Checkpoint(target, "target model"), "target model")
    if method not in METHODS:
        raise CrossLoraError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    lmap = map_layers(layer_map or METHODS[method].default_layer_map, src.num_layers,
                      tgt.num_layers)  # fmt: skip
    expected, warning = expectation(method)
    result = {
        "method": method,
        "source_model": source,
        "target_model": target,
        "source_family": src.checkpoint.model_type,
        "target_family": tgt.checkpoint.model_type,
        "layer_map": {
            "kind": lmap.kind,
            "pairs": {str(i): j for i, j in sorted(lmap.pairs.items())},
            "unmatched_source_layers": lmap.unmatched_src,
            "unmatched_target_layers": lmap.unmatched_tgt,
        },
        "expectation": {"says": expected, "warning": warning},
    }
    if method not in VIEWS:
        return result
    if method == "anchored":
        return result | inspect_anchored(src, tgt, lmap, device, progress)
    seen = inspect_matched(src, tgt, lmap, device, pair_dir or default_pair_dir(), progress)
    return result | seen | {"odds": odds(seen["means"])}


def format_summary(result: dict) -> str:
    lines = [
        f"{result['source_model']} ({result['source_family']}) -> "
        f"{result['target_model']} ({result['target_family']}), as {result['method']} sees them",
        f"layer map: {result['layer_map']['kind']}, {len(result['layer_map']['pairs'])} pairs",
    ]
    if result["method"] == "anchored":
        lines.append(format_anchored(result))
    elif result["method"] == "matched":
        lines += [format_matched(result), result["odds"]["says"]]
    else:
        lines.append(f"inspect measures what {' and '.join(VIEWS)} see; for "
                     f"{result['method']}, what the benchmark measured:")  # fmt: skip
    mark = "warning: " if result["expectation"]["warning"] else "expect: "
    return "\n".join([*lines, mark + result["expectation"]["says"]])


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


def _grid(result: dict) -> tuple[list[str], list[tuple[int, int]], dict]:
    """The heatmap's rows, its columns (layer pairs) and its cells ``{(row, pair): quality}``."""
    if result["method"] == "anchored":
        cells = {(m["role"], tuple(m["layer"])): m["quality"] for m in result["modules"]}
        rows = [r for r in ROLES if any(k[0] == r for k in cells)]
    else:
        rows = [m for m in MAPS if m in result["means"]]
        cells = {(m, tuple(row["layer"])): row[m] for row in result["layers"] for m in rows}
    return rows, sorted({k[1] for k in cells}), cells


def plot_heatmap(result: dict, path: Path, fmt: str | None = None) -> None:
    """The qualities as a heatmap (rows: roles or maps; columns: layer pairs), written to
    ``path`` (as ``fmt``, else as its extension says)."""
    try:
        import matplotlib
    except ImportError as err:
        raise CrossLoraError("--png needs matplotlib: pip install 'crosslora[plot]'") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, pairs, cells = _grid(result)
    grid = torch.full((len(rows), len(pairs)), float("nan"))
    for (row, pair), q in cells.items():
        grid[rows.index(row), pairs.index(pair)] = q
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(pairs) + 2), 1.2 + 0.4 * len(rows)))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(pairs)), [f"{s}→{t}" for s, t in pairs], rotation=90, fontsize=7)
    ax.set_xlabel("source layer → target layer")
    what = ("alignment quality" if result["method"] == "anchored"
            else "held-out map quality (matched)")  # fmt: skip
    ax.set_title(f"{what}: {result['source_family']} → {result['target_family']}", fontsize=9)
    fig.colorbar(im, ax=ax, label="1 − relative residual")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format=fmt)
    finally:
        plt.close(fig)
