"""What ``crosslora inspect`` sees on the benchmark's six pairs, set against what ``matched``
recovered on them (research script, not part of crosslora; docs/results.md, "What inspect sees").
The figures ``crosslora.inspect.odds.BENCHMARK`` holds come from here.

Runs ``crosslora inspect`` (the default, matched's view) on every ordered pair of the three pulled
models, one thread each, keeps each result in OUT/<pair>.json (a pair already there is read, not
run again) and prints each map's mean held-out quality per pair and its rank correlation over the
six pairs with the recovery, then the ``BENCHMARK`` tuple::

    .venv/bin/python experiments/inspect_benchmark.py OUT
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from crosslora.inspect.matched import MAPS
from crosslora.inspect.odds import spearman
from crosslora.paths import crosslora_home

MODELS = {"S": "smollm2-135m", "G": "gemma3-270m", "Q": "qwen2.5-0.5b"}
# matched's NLL gap recovered, mean of three probe draws (docs/results.md, "Over probe draws")
RECOVERED = {"S->G": 0.282, "S->Q": 0.435, "G->S": 0.265, "G->Q": 0.164, "Q->S": 0.366,
             "Q->G": 0.166}  # fmt: skip


def inspected(out: Path, pair: str) -> dict:
    path = out / f"{pair.replace('->', '')}.json"
    if not path.is_file():
        models = crosslora_home() / "models"
        src, tgt = (str(models / MODELS[side]) for side in pair.split("->"))
        subprocess.run([sys.executable, "-m", "crosslora", "inspect", "-q", "--threads", "1",
                        src, tgt, "--json", str(path)], check=True)  # fmt: skip
    return json.loads(path.read_text())


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {pair: inspected(out, pair) for pair in RECOVERED}
    print("pair   recovered " + " ".join(f"{m:>14}" for m in MAPS) + "  aligned")
    for pair, r in results.items():
        cells = " ".join(f"{r['means'][m]:14.3f}" for m in MAPS)
        share = min(r["probe"]["aligned_share_source"], r["probe"]["aligned_share_target"])
        print(f"{pair:6} {RECOVERED[pair]:9.3f} {cells}  {share:7.3f}")
    ys = list(RECOVERED.values())
    rhos = [spearman([results[p]["means"][m] for p in RECOVERED], ys) for m in MAPS]
    print("rank correlation " + " ".join(f"{x:+14.2f}" for x in rhos))
    print("\nROWS = [")
    for pair, r in results.items():
        means = ", ".join(str(r["means"][m]) for m in MAPS)
        print(f'    ("{pair}", {RECOVERED[pair]}, {means}),')
    print("]")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
