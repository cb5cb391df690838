"""The probe text is one draw: transfers with other probe seeds, and their mean adapter
(not a test; docs/results.md, seventeenth session).

``transfer`` runs the committed ``matched`` transfer with ``matched.SEED`` set to SEED::

    .venv/bin/python bench/dev/probe_seeds.py transfer 100 OUT smollm2-135m gemma3-270m

``mean`` writes the mean of K PEFT LoRA adapters of the same modules and rank r: each update
``B A`` divided by K, kept factored. With RANK 0 the K ``A`` (r, in) and ``B`` (out, r) are
stacked (rank K·r); otherwise the mean is cut to its best rank-RANK approximation through a QR of
each stacked factor and an SVD of the (K·r, K·r) core, and the share of each update's energy
kept is printed::

    .venv/bin/python bench/dev/probe_seeds.py mean OUT 16 ADAPTER ADAPTER ADAPTER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import crosslora.methods.matched as mm
from crosslora.cli import main as cli
from crosslora.zoo.models import model_path


def transfer(seed: str, out: str, source: str, target: str) -> int:
    mm.SEED = int(seed)
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


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    raise SystemExit({"transfer": transfer, "mean": mean}[command](*args))
