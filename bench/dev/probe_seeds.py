"""The probe text is one draw: transfers with other probe seeds, and their mean adapter
(not a test; docs/results.md, seventeenth and eighteenth sessions).

``transfer`` runs the committed ``matched`` transfer with ``matched.SEED`` set to SEED, and
``matched.N_TEXTS`` to TEXTS if given (the calibration still reads ``CALIBRATION_TEXTS``)::

    .venv/bin/python bench/dev/probe_seeds.py transfer 100 OUT smollm2-135m gemma3-270m [TEXTS]

``mean`` writes the mean of K PEFT LoRA adapters of the same modules and rank r: each update
``B A`` divided by K, kept factored. With RANK 0 the K ``A`` (r, in) and ``B`` (out, r) are
stacked (rank K·r); otherwise the mean is cut to its best rank-RANK approximation through a QR of
each stacked factor and an SVD of the (K·r, K·r) core, and the share of each update's energy
kept is printed::

    .venv/bin/python bench/dev/probe_seeds.py mean OUT 16 ADAPTER ADAPTER ADAPTER

``rescale`` writes ADAPTER's maps with OTHER's calibration: each role's ``lora_B`` times OTHER's
scale over ADAPTER's (both from ``transfer_report.json``; refused where ADAPTER's scale is 0 and
OTHER's is not), to tell the maps' share of a seed's effect from the calibration's::

    .venv/bin/python bench/dev/probe_seeds.py rescale ADAPTER OTHER OUT

``gap`` prints the NLL gap recovered of ``crosslora eval --output`` files, pooled over their
tasks with the bench's own bootstrap (2000 resamples, seed 0), against BASE and ORACLE::

    .venv/bin/python bench/dev/probe_seeds.py gap BASE ORACLE X...

``diff`` prints each X's gap recovered minus REF's, with a paired 2000-resample bootstrap over the
pooled items (the same resamples for every X, seed 0, drawn as the bench draws them)::

    .venv/bin/python bench/dev/probe_seeds.py diff BASE ORACLE REF X...

``agree`` prints how far two adapters of the same modules (two draws, say) agree in direction: for
each factor, the mean squared cosine of the principal angles between the two column spaces of
``lora_B`` (out, r), or row spaces of ``lora_A`` (r, in) (1: the same subspace; r / width for
unrelated ones), averaged over the readers' ``lora_A`` (q, k, v, gate, up), the writers' ``lora_A``
and the writers' ``lora_B`` (o, down), over the modules where neither is zero::

    .venv/bin/python bench/dev/probe_seeds.py agree ADAPTER OTHER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import crosslora.methods.matched as mm
from crosslora.bench import _gap
from crosslora.cli import main as cli
from crosslora.eval.metrics import _percentiles, _resample_means, item_values
from crosslora.zoo.models import model_path


def transfer(seed: str, out: str, source: str, target: str, texts: str | None = None) -> int:
    mm.SEED = int(seed)
    if texts:
        mm.N_TEXTS = int(texts)
    return cli([
        "transfer", "--adapter", f"adapters/{source}-commonsense",
        "--source-model", str(model_path(source, must_exist=True)),
        "--target-model", str(model_path(target, must_exist=True)),
        "--out-path", out, "--method", "matched", "-q", "--overwrite",
    ])  # fmt: skip


def factors(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """The best rank-``rank`` factors of ``b @ a``, and the share of its energy they keep."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    kept = s[:rank].square().sum() / s.square().sum().clamp_min(1e-30)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]) @ qa.T, qb @ u[:, :rank] * root, kept


def mean(out: str, rank: str, *adapters: str) -> int:
    paths = [Path(p) for p in adapters]
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in paths]
    first = configs[0]
    for c in configs:
        if (c["r"], c["lora_alpha"]) != (first["r"], first["lora_alpha"]) or c["rank_pattern"]:
            raise SystemExit("the adapters differ in rank or alpha, or have rank patterns")
    weights = [load_file(p / "adapter_model.safetensors") for p in paths]
    if any(w.keys() != weights[0].keys() for w in weights):
        raise SystemExit("the adapters adapt different modules")
    k, r = len(paths), int(rank) or first["r"] * len(paths)
    result, kept = {}, []
    for key_a in (key for key in weights[0] if "lora_A" in key):
        key_b = key_a.replace("lora_A", "lora_B")
        a = torch.cat([w[key_a].double() for w in weights], 0)
        b = torch.cat([w[key_b].double() for w in weights], 1) / k
        if int(rank):
            a, b, share = factors(a, b, r)
            kept.append(share.item())
        result[key_a], result[key_b] = a.float().contiguous(), b.float().contiguous()
    Path(out).mkdir(parents=True, exist_ok=True)
    config = dict(first, r=r, lora_alpha=first["lora_alpha"] * r / first["r"])  # same scale
    (Path(out) / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(result, Path(out) / "adapter_model.safetensors", metadata={"format": "pt"})
    if kept:
        print(f"energy kept: min {min(kept):.3f}, mean {sum(kept) / len(kept):.3f}")
    return 0


def rescale(adapter: str, other: str, out: str) -> int:
    def scales(path: Path) -> dict[str, float]:
        report = json.loads((path / "transfer_report.json").read_text())
        return report["method_diagnostics"]["calibration"]

    src, dst = Path(adapter), Path(out)
    old, new = scales(src), scales(Path(other))
    if any(old[r] == 0 and new[r] != 0 for r in old):
        raise SystemExit(f"{adapter} dropped a role that {other} keeps")
    ratio = {r: new[r] / old[r] if old[r] else 0.0 for r in old}
    role = lambda key: next(r for r in ratio if f".{r}_proj." in key)  # noqa: E731
    weights = load_file(src / "adapter_model.safetensors")
    weights = {k: v * ratio[role(k)] if "lora_B" in k else v for k, v in weights.items()}
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "transfer_report.json"):
        (dst / name).write_text((src / name).read_text())
    save_file(weights, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    print(", ".join(f"{r} x{c:.3f}" for r, c in ratio.items()))
    return 0


def gap(base: str, oracle: str, *evals: str) -> int:
    b, o = (json.loads(Path(p).read_text()) for p in (base, oracle))
    for path in evals:
        g = _gap(b, json.loads(Path(path).read_text()), o, list(b["tasks"]), "nll", 2000, 0)
        print(f"{path}: {g['text']}")
    return 0


def pooled(path: str) -> dict[str, float]:
    """``{task/item id: gold NLL}`` over every task of an eval output."""
    tasks = json.loads(Path(path).read_text())["tasks"]
    return {f"{t}/{k}": v for t, r in tasks.items() for k, v in item_values(r, "nll").items()}


def diff(base: str, oracle: str, ref: str, *evals: str) -> int:
    b, o, r = pooled(base), pooled(oracle), pooled(ref)
    for path in evals:  # each X resampled alike (seed 0), whatever its place in the list
        x = pooled(path)
        ids = [k for k in b if k in o and k in r and k in x]
        cols = np.array([[m[k] for k in ids] for m in (b, o, r, x)]).T  # (items, 4)
        means = _resample_means(cols, 2000, 0)  # (2000, 4)
        d = (means[:, 3] - means[:, 2]) / (means[:, 1] - means[:, 0])
        point = (cols[:, 3].mean() - cols[:, 2].mean()) / (cols[:, 1].mean() - cols[:, 0].mean())
        low, high = _percentiles(d, 0.95)
        print(f"{path}: minus {ref}: {point:+.3f} [{low:+.3f}, {high:+.3f}]")
    return 0


def subspace_agreement(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of x and y."""
    qx, qy = torch.linalg.qr(x.double())[0], torch.linalg.qr(y.double())[0]
    return float(torch.linalg.svdvals(qx.mT @ qy).square().mean())


def agree(adapter: str, other: str) -> int:
    a, b = (load_file(Path(p) / "adapter_model.safetensors") for p in (adapter, other))
    groups: dict[str, list[float]] = {"readers A": [], "writers A": [], "writers B": []}
    for key in a:
        if key not in b or not (a[key].any() and b[key].any()):
            continue  # a lora_B the calibration zeroed (its role's scale 0)
        writer = any(f".{r}." in key for r in ("o_proj", "down_proj"))
        if "lora_A" in key:
            groups["writers A" if writer else "readers A"].append(
                subspace_agreement(a[key].mT, b[key].mT)
            )
        elif writer:
            groups["writers B"].append(subspace_agreement(a[key], b[key]))
    print(", ".join(f"{g} {sum(v) / len(v):.3f}" for g, v in groups.items() if v))
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    commands = {
        "transfer": transfer,
        "mean": mean,
        "rescale": rescale,
        "gap": gap,
        "diff": diff,
        "agree": agree,
    }
    raise SystemExit(commands[command](*args))
