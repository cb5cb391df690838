"""The refine's benchmark on one real pair: ``matched`` alone, then refines of it (data-free,
with 32 prompts from the adapters' *training* split, from an untrained LoRA, with the divergence
objective), each evaluated on the benchmark's items. CPU hours; never CI.

Each refine starts from the ``matched`` adapter given with ``--matched`` (a ``crosslora transfer``
output for this pair): the refine reads it as its starting point, exactly as ``transfer --refine``
does after the transfer, and the refined factors are written into a copy of it. Per variant:
``<out>/<name>/`` (the adapter and ``refine.json``), ``<out>/eval_<name>.json``; then the gap
recovered on NLL, with intervals, through experiments/probe_seeds.py.

Usage::

    python bench/refine_table.py --source-model M_S --target-model M_T --adapter A \\
        --matched OUT_MATCHED --base-eval EV_BASE --oracle-eval EV_ORACLE --out DIR \\
        [--variants data-free,prompts,untrained,kl] [--steps 75] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "experiments")]
from probe_seeds import pooled  # noqa: E402
from train_adapter import SOURCES, load_examples  # noqa: E402

from crosslora.io.peft_adapter import read_adapter  # noqa: E402
from crosslora.pipeline import TransferOptions, plan_transfers  # noqa: E402
from crosslora.refine import RefineParams, refine  # noqa: E402

PER_SOURCE = 400  # the shipped adapters' --per-source (their training_config.json)
TASKS = "arc_easy,arc_challenge,openbookqa,hellaswag"
VARIANTS = {
    "data-free": {},
    "prompts": {"prompts": True},
    "untrained": {"prompts": True, "start": "untrained"},
    "kl": {"prompts": True, "objective": "kl"},
    "nll": {"prompts": True, "objective": "nll"},
    "untrained-nll": {"prompts": True, "start": "untrained", "objective": "nll"},
    "no-selection": {"prompts": True, "token_keep": 1.0},  # every token of the kept texts
}


def training_prompts(n: int, seed: int) -> list[str]:
    """``n`` task inputs (lm-eval's contexts, no answers) drawn evenly from the ARC-Easy,
    ARC-Challenge and OpenBookQA rows the shipped adapters were trained on (never the
    validation items the table scores, nor the development task's unseen train rows)."""
    rng, out = random.Random(seed), []
    used, _ = load_examples(0, PER_SOURCE)
    for k, source in enumerate(SOURCES):
        rows = sorted(e["context"] for e in used if e["source"] == source)
        take = n // len(SOURCES) + (k < n % len(SOURCES))
        out += rng.sample(rows, take)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--source-model", "--target-model", "--adapter", "--matched", "--base-eval",
                 "--oracle-eval", "--out"):  # fmt: skip
        ap.add_argument(flag, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=RefineParams.steps)
    ap.add_argument("--text-tokens", type=int, default=RefineParams.text_tokens)
    ap.add_argument("--texts", type=int, default=RefineParams.texts)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = training_prompts(32, 0)
    (out / "prompts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    batch, plans = plan_transfers([args.adapter], args.source_model, args.target_model,
                                  TransferOptions(method="matched"))  # fmt: skip
    inputs, tasks = batch[0], plans[0].tasks
    start = read_adapter(args.matched)
    factors = [(m, start.factors(m)) for m in sorted(start.modules)]
    evals = []
    for name in args.variants.split(","):
        v = dict(VARIANTS[name])
        params = RefineParams(steps=args.steps, texts=args.texts, text_tokens=args.text_tokens)
        params = replace(params, prompts=tuple(prompts) if v.pop("prompts", False) else (), **v)
        folder = out / name
        if not (folder / "refine.json").exists():
            # the teacher's texts depend only on the prompts: written once, read by the others
            work = out / f"work-{name}"
            work.mkdir(exist_ok=True)
            shared = out / f"teacher-{'prompts' if params.prompts else 'free'}.json"
            if shared.exists():
                shutil.copy(shared, work / "teacher.json")
            t0 = time.perf_counter()
            refined, report = refine(inputs, tasks, factors, params, torch.device("cpu"), work)
            shutil.copy(work / "teacher.json", shared)
            report["seconds_total"] = round(time.perf_counter() - t0, 1)
            write_like(Path(args.matched), folder, dict(refined), start)
            (folder / "refine.json").write_text(json.dumps(report, indent=1) + "\n")
        ev = out / f"eval_{name}.json"
        if not ev.exists():
            subprocess.run([sys.executable, "-m", "crosslora", "eval", "--model",
                            args.target_model, "--adapter", str(folder), "--tasks", TASKS,
                            "--limit", str(args.limit), "--batch-size", "16", "--output", str(ev),
                            "-q"], check=True)  # fmt: skip
        evals.append(str(ev))
        r = json.loads((folder / "refine.json").read_text())
        print(f"{name}: {r['seconds_total']} s, kept {r['texts_kept']} texts, "
              f"{r['target_tokens_kept']} target tokens, loss {r['loss_curve'][0][1]} -> "
              f"{r['loss_curve'][-1][1]}", flush=True)  # fmt: skip
    matched_eval = out / "eval_matched.json"
    if not matched_eval.exists():
        subprocess.run([sys.executable, "-m", "crosslora", "eval", "--model", args.target_model,
                        "--adapter", args.matched, "--tasks", TASKS, "--limit", str(args.limit),
                        "--batch-size", "16", "--output", str(matched_eval), "-q"], check=True)
    summary = table(args.base_eval, args.oracle_eval, str(matched_eval), evals)
    (out / "table.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


GROUPS = {"all": None, "prompted tasks": ("arc_easy", "arc_challenge", "openbookqa"),
          "hellaswag": ("hellaswag",)}  # fmt: skip


def table(base: str, oracle: str, matched: str, evals: list[str]) -> dict:
    """Per task group: each column's NLL gap recovered (bootstrap 95 % interval, as the bench)
    and its difference from ``matched`` alone, paired over items; also printed."""
    from crosslora.eval import gap_recovered

    load = {p: pooled(p) for p in [base, oracle, matched, *evals]}
    out: dict = {}
    for group, tasks in GROUPS.items():
        pick = [k for k in load[base] if tasks is None or k.split("/")[0] in tasks]
        b, o, m = (np.array([load[p][k] for k in pick]) for p in (base, oracle, matched))
        rows = {"matched": str(gap_recovered(b, m, o, 2000, 0))}
        for path in evals:
            x = np.array([load[path][k] for k in pick])
            name = Path(path).stem.removeprefix("eval_")
            g, d = gap_recovered(b, x, o, 2000, 0), gap_recovered(b, b + (x - m), o, 2000, 0)
            rows[name] = f"{g}; minus matched {d}; NLL minus matched {_paired(x - m)}"
        out[group] = {"items": len(pick), **rows}
        print(f"{group} ({len(pick)} items):")
        for name, line in rows.items():
            print(f"  {name}: {line}")
    return out


def _paired(diff: np.ndarray) -> str:
    """The mean per-item difference in nats (lower is better) with a 2000-resample bootstrap
    95 % interval: the comparison that stays defined where the oracle does not beat the base."""
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (2000, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{diff.mean():+.4f} nats [{low:+.4f}, {high:+.4f}]"


def write_like(matched: Path, folder: Path, refined: dict, start) -> None:
    """A copy of the ``matched`` output with the refined factors in place of its own (same keys,
    shapes and dtype), staged and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(matched, tmp)
    path = tmp / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in list(tensors):
        module = next((m for m in refined if key.endswith(f"{m}.lora_A.weight") or
                       key.endswith(f"{m}.lora_B.weight")), None)  # fmt: skip
        if module is None:
            continue
        f = refined[module]
        scale = f.scale / start.factors(module).scale  # the written alpha / r applies as before
        new = f.A if key.endswith("lora_A.weight") else f.B * scale
        tensors[key] = new.to(tensors[key].dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    tmp.rename(folder)


if __name__ == "__main__":
    raise SystemExit(main())
