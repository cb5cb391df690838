"""``results.png``: gap recovered (NLL and acc_norm) per pair and method, with its interval.

Optional: without matplotlib (``pip install 'crosslora[plot]'``) the benchmark warns and
writes the JSON and markdown results only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("crosslora")


def plot(results: dict, path: Path) -> None:
    """Two panels, NLL and acc_norm: a bar per method and pair, x where the gap is undefined."""
    try:
        import matplotlib
    except ImportError:
        log.warning("warning: matplotlib is missing; no plot (pip install 'crosslora[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results["pairs"]
    methods = results["settings"]["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(pairs) + 3), 4), sharey=False)
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, ("nll", "acc_norm")):
        for k, m in enumerate(methods):
            xs, ys, lo, hi, undefined = [], [], [], [], []
            for i, p in enumerate(pairs):
                g = p["methods"][m][metric]["all"]
                x = i + (k - (len(methods) - 1) / 2) * width
                if g["interval"] is None:
                    undefined.append(x)
                    continue
                iv = g["interval"]
                xs.append(x)
                ys.append(iv["point"])
                lo.append(iv["point"] - iv["low"])
                hi.append(iv["high"] - iv["point"])
            ax.bar(xs, ys, width, yerr=np.array([lo, hi]) if xs else None, label=m, capsize=2)
            if undefined:
                ax.plot(undefined, [0] * len(undefined), "x", color="gray")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(1, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(pairs)), [f"{p['source']}\n→ {p['target']}" for p in pairs],
                      fontsize=7)  # fmt: skip
        ax.set_title(f"gap recovered ({metric}); x: undefined", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
