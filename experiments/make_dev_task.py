"""A development task for choosing method settings, never the benchmark's items (research
script, not part of crosslora; docs/results.md, "The development task").

Takes ARC-Easy and ARC-Challenge *train* rows that no shipped adapter was trained on (the
adapters use a seeded sample of 400 parsed rows per source, ``bench/train_adapter.py``), draws
``--per-source`` of them with a fixed seed, and writes them as a local task for ``crosslora
eval``/``bench``: ``experiments/dev_task/arc_dev.json`` and ``arc_dev.jsonl`` beside it. Prompt
format as ARC in lm-eval (``Question: …\\nAnswer:``, choices scored as continuations).

    .venv/bin/python experiments/make_dev_task.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_adapter import untrained_rows  # noqa: E402  (bench/train_adapter.py)

OUT = Path(__file__).resolve().parent / "dev_task"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-source", type=int, default=100)
    p.add_argument("--train-per-source", type=int, default=400, help="as the adapters' training")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    free = untrained_rows(args.train_per_source)
    rng = random.Random(args.seed)
    lines = []
    for source in ("arc_easy", "arc_challenge"):
        for i, (q, choices, gold) in sorted(rng.sample(free[source], args.per_source)):
            lines.append({"id": f"{source}-train-{i}", "question": q, "choices": choices,
                          "gold": gold})  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "arc_dev.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = {"name": "arc_dev", "text": "Question: {question}\nAnswer:", "choices": "choices",
            "gold": "gold", "id_field": "id", "splits": ["validation"],
            "files": {"validation": "arc_dev.jsonl"}}  # fmt: skip
    (OUT / "arc_dev.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {len(lines)} items to {OUT / 'arc_dev.jsonl'}")


if __name__ == "__main__":
    main()
