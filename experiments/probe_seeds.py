"""`matched`'s probe text is one random draw: transfers with other probe seeds, the mean adapter
of several draws, and their scores against the base model and the oracle (research script, not
part of crosslora; docs/results.md, "Over probe draws" and "Where the rest is lost").

``transfer`` runs a default ``matched`` transfer of SOURCE's shipped adapter with the probe seed
SEED (``MatchedParams(seed=SEED)``; ``--texts N``: ``MatchedParams(n_texts=N)``, the calibration
still reads its default 32 texts)::

    .venv/bin/python experiments/probe_seeds.py transfer 100 OUT smollm2-135m gemma3-270m

``mean`` writes the mean of K PEFT LoRA adapters of the same modules and rank r: each update
``B A`` divided by K, kept factored. With RANK 0 the K ``A`` (r, in) and ``B`` (out, r) are
stacked (rank K·r); otherwise the mean is cut to its best rank-RANK approximation through a QR of
each stacked factor and an SVD of the (K·r, K·r) core, and the share of each update's energy
kept is printed::

    .venv/bin/python experiments/probe_seeds.py mean OUT 16 ADAPTER ADAPTER ADAPTER

``gap`` prints the NLL gap recovered of ``crosslora eval --output`` files, pooled over their
tasks as the bench pools them (2000 resamples, seed 0), against BASE and ORACLE::

    .venv/bin/python experiments/probe_seeds.py gap BASE ORACLE X...

``diff`` prints each X's gap recovered minus REF's, with a paired 2000-resample bootstrap over the
pooled items (the same resamples for every X, seed 0, drawn as the bench draws them)::

    .venv/bin/python experiments/probe_seeds.py diff BASE ORACLE REF X...

``agree`` prints how far two adapters of the same modules (two draws, say) agree in direction: for
each factor, the mean squared cosine of the principal angles between the two column spaces of
``lora_B`` (out, r), or row spaces of ``lora_A`` (r, in) (1: the same subspace; r / width for
unrelated ones), averaged over the readers' ``lora_A`` (q, k, v, gate, up), the writers' ``lora_A``
and the writers' ``lora_B`` (o, down), over the modules where neither is zero::

    .venv/bin/python experiments/probe_seeds.py agree ADAPTER OTHER

Models are named as in ``crosslora models pull`` (looked up in ``$CROSSLORA_HOME/models``, else
``~/.cache/crosslora/models``) or given as folders.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from crosslora import MatchedParams, TransferOptions, plan_transfers, transfer
from crosslora.eval import gap_recovered

REPO = Path(__file__).resolve().parents[1]
RESAMPLES, SEED = 2000, 0  # the bench's bootstrap


def model_folder(name: str) -> str:
    """A model folder as given, else the folder ``crosslora models pull NAME`` fills."""
    if Path(name).is_dir():
        return name
    home = os.environ.get("CROSSLORA_HOME")
    cache = Path(home) / "models" if home else Path.home() / ".cache/crosslora/models"
    if not (cache / name).is_dir():
        raise SystemExit(f"model {name!r} not found: run `crosslora models pull {name}`")
    return str(cache / name)


def run_transfer(args: argparse.Namespace) -> int:
    params = MatchedParams(seed=args.seed, **({"n_texts": args.texts} if args.texts else {}))
    options = TransferOptions(method="matched", params=params)
    adapter = args.adapter or str(REPO / "adapters" / f"{args.source}-commonsense")
    src, tgt = model_folder(args.source), model_folder(args.target)
    if args.dry_run:
        _, plans = plan_transfers([adapter], src, tgt, options)
        print("\n".join(plan.describe() for plan in plans))
        return 0
    report = transfer(adapter, src, tgt, args.out, options, overwrite=True, progress=False)
    print(json.dumps(report["summary"]))
    return 0


def factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """The best rank-``rank`` factors of ``b @ a``, and the share of its energy they keep."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    kept = s[:rank].square().sum() / s.square().sum().clamp_min(1e-30)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]) @ qa.T, qb @ u[:, :rank] * root, kept


def mean(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.adapters]
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in paths]
    first = configs[0]
    for c in configs:
        if (c["r"], c["lora_alpha"]) != (first["r"], first["lora_alpha"]) or c["rank_pattern"]:
            raise SystemExit("the adapters differ in rank or alpha, or have rank patterns")
    weights = [load_file(p / "adapter_model.safetensors") for p in paths]
    if any(w.keys() != weights[0].keys() for w in weights):
        raise SystemExit("the adapters adapt different modules")
    k, r = len(paths), args.rank or first["r"] * len(paths)
    result, kept = {}, []
    for key_a in (key for key in weights[0] if "lora_A" in key):
        key_b = key_a.replace("lora_A", "lora_B")
        a = torch.cat([w[key_a].double() for w in weights], 0)
        b = torch.cat([w[key_b].double() for w in weights], 1) / k
        if args.rank:
            a, b, share = factors(a, b, r)
            kept.append(share.item())
        result[key_a], result[key_b] = a.float().contiguous(), b.float().contiguous()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(first, r=r, lora_alpha=first["lora_alpha"] * r / first["r"])  # same scale
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(result, out / "adapter_model.safetensors", metadata={"format": "pt"})
    if kept:
        print(f"energy kept: min {min(kept):.3f}, mean {sum(kept) / len(kept):.3f}")
    return 0


def pooled(path: str) -> dict[str, float]:
    """``{task/item id: gold NLL}`` over every task of a ``crosslora eval --output`` file."""
    tasks = json.loads(Path(path).read_text())["tasks"]
    return {f"{t}/{rec['id']}": rec["nll"] for t, r in tasks.items() for rec in r["items"]}


def columns(*evals: dict[str, float]) -> list[np.ndarray]:
    """Each eval's values on the items all of them hold, in the first one's order."""
    ids = [k for k in evals[0] if all(k in e for e in evals[1:])]
    return [np.array([e[k] for k in ids]) for e in evals]


def gap(args: argparse.Namespace) -> int:
    b, o = pooled(args.base), pooled(args.oracle)
    for path in args.evals:
        base, x, oracle = columns(b, pooled(path), o)
        print(f"{path}: {gap_recovered(base, x, oracle, RESAMPLES, SEED)}")
    return 0


def diff(args: argparse.Namespace) -> int:
    b, o, r = pooled(args.base), pooled(args.oracle), pooled(args.ref)
    for path in args.evals:  # each X resampled alike (seed 0), whatever its place in the list
        base, oracle, ref, x = columns(b, o, r, pooled(path))
        # (x̄ - r̄) / (ō - b̄) is the gap recovered of an eval that scores b + (x - r) per item,
        # with every resample drawing the same items for all four columns
        g = gap_recovered(base, base + (x - ref), oracle, RESAMPLES, SEED)
        if g.interval is None:
            print(f"{path}: minus {args.ref}: {g}")
        else:
            i = g.interval
            print(f"{path}: minus {args.ref}: {i.point:+.3f} [{i.low:+.3f}, {i.high:+.3f}]")
    return 0


def subspace_agreement(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of x and y."""
    qx, qy = torch.linalg.qr(x.double())[0], torch.linalg.qr(y.double())[0]
    return float(torch.linalg.svdvals(qx.mT @ qy).square().mean())


def agree(args: argparse.Namespace) -> int:
    a, b = (load_file(Path(p) / "adapter_model.safetensors") for p in (args.adapter, args.other))
    groups: dict[str, list[float]] = {"readers A": [], "writers A": [], "writers B": []}
    for key in a:
        if key not in b or not (a[key].any() and b[key].any()):
            continue  # a lora_B the calibration zeroed (its role's scale 0)
        writer = any(f".{r}." in key for r in ("o_proj", "down_proj"))
        if "lora_A" in key:
            group = groups["writers A" if writer else "readers A"]
            group.append(subspace_agreement(a[key].mT, b[key].mT))
        elif writer:
            groups["writers B"].append(subspace_agreement(a[key], b[key]))
    print(", ".join(f"{g} {sum(v) / len(v):.3f}" for g, v in groups.items() if v))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("transfer", help="a matched transfer with another probe seed")
    t.add_argument("seed", type=int)
    t.add_argument("out")
    t.add_argument("source", help="model name (crosslora models pull) or folder")
    t.add_argument("target", help="model name (crosslora models pull) or folder")
    t.add_argument("--texts", type=int, help="probe texts (MatchedParams.n_texts)")
    t.add_argument("--adapter", help="default: adapters/<source>-commonsense")
    t.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    t.set_defaults(run=run_transfer)
    m = sub.add_parser("mean", help="the mean of K adapters, cut back to RANK (0: stacked)")
    m.add_argument("out")
    m.add_argument("rank", type=int)
    m.add_argument("adapters", nargs="+")
    m.set_defaults(run=mean)
    g = sub.add_parser("gap", help="pooled NLL gap recovered of eval outputs")
    g.add_argument("base")
    g.add_argument("oracle")
    g.add_argument("evals", nargs="+")
    g.set_defaults(run=gap)
    d = sub.add_parser("diff", help="gap recovered minus REF's, paired bootstrap")
    d.add_argument("base")
    d.add_argument("oracle")
    d.add_argument("ref")
    d.add_argument("evals", nargs="+")
    d.set_defaults(run=diff)
    a = sub.add_parser("agree", help="subspace agreement of two adapters' factors")
    a.add_argument("adapter")
    a.add_argument("other")
    a.set_defaults(run=agree)
    args = p.parse_args()
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
