"""DIAGNOSTIC, uses data (not a method): `matched` with the task's own text as its probe text.

The best case for any data-free probe text is the task's text itself. This script transfers with
`matched` while replacing its self-generated probe text, for the maps, the calibration or both,
by ARC-Easy, ARC-Challenge and OpenBookQA *train* rows in the adapters' prompt format with their
gold answers (``context + continuation`` as ``bench/train_adapter.py`` builds them). It uses rows
that no shipped adapter was trained on and that are not in the development task (`bench/dev/`):

    .venv/bin/python bench/dev/task_probe.py smollm2-135m gemma3-270m OUT --texts 320 --use both
    .venv/bin/python bench/dev/task_probe.py ... --texts 160 --use calibration  # maps: generic
    .venv/bin/python bench/dev/task_probe.py ... --texts 320 --use maps  # calibration: generic

``--use maps`` calibrates on 32 generic texts sampled as `matched` samples its own, with other
seeds (held out from the maps); ``--use calibration`` fits the maps on `matched`'s own 64 texts.
Then score OUT with ``crosslora eval --tasks bench/dev/arc_dev.json``. Model names are those of
`crosslora models pull`; the adapter is the source's shipped one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import crosslora.methods.matched as mm
from crosslora.anchor.probe import align, load_model
from crosslora.anchor.vocab import load_tokenizer
from crosslora.transfer import TransferOptions, transfer
from crosslora.zoo.models import model_path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))
from train_adapter import to_request, untrained_rows  # noqa: E402


def task_texts(n: int, seed: int = 7) -> list[str]:
    """``n`` train rows (prompt + gold answer), none trained on and none in the dev task."""
    dev_rows = (BENCH / "dev" / "arc_dev.jsonl").read_text().splitlines()
    dev = {json.loads(line)["id"] for line in dev_rows}
    pool = [
        "".join(to_request(source, *parsed))
        for source, rows in untrained_rows(400).items()  # the shipped adapters' --per-source
        for i, parsed in rows
        if f"{source}-train-{i}" not in dev
    ]
    return random.Random(seed).sample(pool, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("out", type=Path)
    p.add_argument("--texts", type=int, default=320)
    p.add_argument("--use", choices=("both", "maps", "calibration"), default="both")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    path_s = model_path(args.source, must_exist=True)
    path_t = model_path(args.target, must_exist=True)
    texts = task_texts(args.texts)
    if args.use != "calibration":  # the maps read the task text; `prepare` samples it in halves
        halves = iter([texts[: len(texts) // 2], texts[len(texts) // 2 :]])
        mm.sample_texts = lambda *a, **k: next(halves)
    calibration = None
    if args.use != "both":
        tok_s, tok_t = load_tokenizer(path_s, "source"), load_tokenizer(path_t, "target")
        if args.use == "calibration":
            held = texts
        else:  # 32 generic texts sampled as `matched` samples its own, with the next two seeds
            cpu = torch.device("cpu")
            held = mm.probe_texts(load_model(path_s, cpu, "source"), tok_s,
                                  load_model(path_t, cpu, "target"), tok_t,
                                  mm.CALIBRATION_TEXTS, mm.SEED + 2)  # fmt: skip
        calibration = align(held, tok_s, tok_t)
    prepare = mm.Matched.prepare

    def prepare_then_swap(self, src, tgt, device):
        info = prepare(self, src, tgt, device)
        if calibration is not None:
            self.batches = calibration
        return info

    mm.Matched.prepare = prepare_then_swap
    adapter = BENCH.parent / "adapters" / f"{args.source}-commonsense"
    transfer(str(adapter), str(path_s), str(path_t), args.out, TransferOptions(method="matched"),
             overwrite=True)  # fmt: skip


if __name__ == "__main__":
    main()
