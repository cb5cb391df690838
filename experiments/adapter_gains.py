"""How much each shipped adapter helps its own model, and what that means for a transfer's gap
recovered (research script, not part of crosslora; docs/results.md, "Refine").

The gap recovered is measured against the *target's* adapter: (transferred − base) / (oracle −
base) on the target. A transfer that moves the target's gold-answer NLL by exactly what the source
adapter moves the source's would recover ``gain(source) / gain(target)``, with ``gain`` the mean
NLL drop per item an adapter gives its own base. Where the source adapter helps its model less
than the target's helps the target, carrying the source adapter whole recovers less than 1; where
it helps more, a fraction of it is enough. ``carried`` reads a transfer's gap the other way: the
share of the source adapter's own gain (in nats per item) the transfer gives the target.

    .venv/bin/python experiments/adapter_gains.py S=BASE_S,ORACLE_S G=BASE_G,ORACLE_G ... \\
        [--transfer S:G:EVAL ...]

Each BASE / ORACLE / EVAL is a ``crosslora eval --output`` file of the same items.
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_seeds import RESAMPLES, SEED, columns, pooled

from crosslora.eval import bootstrap_ci


def gain(base: dict[str, float], oracle: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the base's NLL and its drop under the adapter (base − oracle), in nats."""
    b, o = columns(base, oracle)
    return b, b - o


def interval(x: np.ndarray) -> str:
    iv = bootstrap_ci(x, RESAMPLES, SEED)
    return f"{iv.point:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="NAME=BASE_EVAL,ORACLE_EVAL")
    ap.add_argument("--transfer", action="append", default=[], help="SOURCE:TARGET:EVAL")
    args = ap.parse_args()
    gains, bases, evals = {}, {}, {}
    for spec in args.models:
        name, files = spec.split("=", 1)
        evals[name] = [pooled(f) for f in files.split(",")]
        bases[name], gains[name] = gain(*evals[name])
        share = gains[name].mean() / bases[name].mean()
        print(f"{name}: the adapter's gain {interval(gains[name])} nats per item; base NLL "
              f"{bases[name].mean():.3f} (gain / base {share:.3f})")  # fmt: skip
    for s in gains:
        for t in gains:
            if s != t:
                print(f"{s} -> {t}: gain({s}) / gain({t}) = "
                      f"{gains[s].mean() / gains[t].mean():.2f}")  # fmt: skip
    for spec in args.transfer:
        s, t, path = spec.split(":", 2)
        b, o, x = columns(*evals[t], pooled(path))
        drop = float((b - x).mean())
        print(f"{s} -> {t} ({path}): the target's NLL drop {drop:.3f} nats per item, gap "
              f"recovered {drop / (b - o).mean():.3f}, carried {drop / gains[s].mean():.3f} of "
              f"the source adapter's gain")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
