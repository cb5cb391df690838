"""Transfer cost at 1B-7B shapes, measured: exact vs fast SVD, the basis cache, memory vs size
and depth.

Not a test. Writes synthetic sharded bf16 checkpoints (llama source, mistral target, the real
models' shapes, weights with a decaying spectrum) and rank-16 adapters on all seven modules
under --work (default /tmp/crosslora-perf), runs every configuration in its own subprocess
(so peak RSS is per configuration: ``VmHWM`` of that process), and prints a markdown
summary and writes ``--results`` (JSON, default /tmp/crosslora-perf.json). The synthetic files
are deleted at the end (--keep keeps them).

    .venv/bin/python bench/perf.py --size 7b --layers 4 --exact-layers 1   # the full measurement
    .venv/bin/python bench/perf.py --size 1b --layers 4 --exact-layers 1   # a quick run

Measured, per size (``--size`` may repeat: 1b, 3b, 7b):

- exact vs fast: one cold ``cross-lora`` transfer of the first ``--exact-layers`` layers with
  ``--svd exact`` and one with ``--svd fast`` (no cache): wall time, ratio, relative ΔW error
  of the fast adapter against the exact one (per module, from the factors, in float64);
- the cache: a cold fast transfer of ``--layers`` layers that fills a fresh cache, then the same
  transfer warm (every basis a hit);
- peak RSS and time against depth: the cold fast run at 1, 2, ... ``--layers`` layers (adapters
  covering that many layers; the same checkpoints).

Weights: per (model, role) one matrix ``W = U diag(s) Vᵀ + noise`` with ``s_i ∝ i^-0.5`` for
the top ``min(1024, m, n)`` components (``U``, ``V`` orthonormalised thin Gaussians) and a
Gaussian bulk just below; each layer gets its own random row and column permutation and row signs
of it (the same spectrum, different singular vectors; cheap). Anchored is not run here (it needs
tokenizers and fits full-rank maps per layer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROLES = {  # role -> (module path suffix, (out, in) from config)
    "q": ("self_attn.q_proj", lambda c: (c["heads"] * c["head_dim"], c["hidden"])),
    "k": ("self_attn.k_proj", lambda c: (c["kv_heads"] * c["head_dim"], c["hidden"])),
    "v": ("self_attn.v_proj", lambda c: (c["kv_heads"] * c["head_dim"], c["hidden"])),
    "o": ("self_attn.o_proj", lambda c: (c["hidden"], c["heads"] * c["head_dim"])),
    "gate": ("mlp.gate_proj", lambda c: (c["inter"], c["hidden"])),
    "up": ("mlp.up_proj", lambda c: (c["inter"], c["hidden"])),
    "down": ("mlp.down_proj", lambda c: (c["hidden"], c["inter"])),
}

THREADS = 0  # torch threads in the children (0: torch's default)
DEVICE = "cpu"  # where the children compute (--device)
DEPTHS: list[int] = []  # layer counts for the depth curve (empty: 1, 2, 4, ... up to --layers)

# size -> (source: llama, target: mistral); the real models' shapes
SIZES = {
    "smoke": (  # a check of this script, in seconds
        dict(model_type="llama", hidden=256, inter=512, layers=2, heads=4, kv_heads=4, vocab=512),
        dict(model_type="mistral", hidden=256, inter=768, layers=2, heads=4, kv_heads=2,
             vocab=512),
    ),
    "1b": (  # TinyLlama-1.1B -> a Llama-3.2-1B-shaped mistral
        dict(model_type="llama", hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4,
             vocab=32000),
        dict(model_type="mistral", hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8,
             vocab=32768),
    ),
    "3b": (  # OpenLLaMA-3B -> a Llama-3.2-3B-shaped mistral
        dict(model_type="llama", hidden=3200, inter=8640, layers=26, heads=32, kv_heads=32,
             vocab=32000),
        dict(model_type="mistral", hidden=3072, inter=8192, layers=28, heads=24, kv_heads=8,
             vocab=32768),
    ),
    "7b": (  # Llama-2-7B -> Mistral-7B
        dict(model_type="llama", hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32,
             vocab=32000),
        dict(model_type="mistral", hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8,
             vocab=32768),
    ),
}  # fmt: skip


def hf_config(c: dict, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM" if c["model_type"] == "llama" else
                          "MistralForCausalLM"],
        "model_type": c["model_type"], "hidden_size": c["hidden"],
        "intermediate_size": c["inter"], "num_hidden_layers": layers,
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
        "head_dim": c["hidden"] // c["heads"], "vocab_size": c["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu",
    }  # fmt: skip


def _orth(x: torch.Tensor) -> torch.Tensor:
    chol = torch.linalg.cholesky(x.double().T @ x.double())
    return torch.linalg.solve_triangular(chol, x.double().T, upper=False).T.float()


def spectral(m: int, n: int, gen: torch.Generator, rank: int = 1024) -> torch.Tensor:
    """``U diag(s) Vᵀ + noise``: s_i = i^-0.5 for i <= r, a Gaussian bulk just below s_r."""
    r = min(rank, m, n)
    u = _orth(torch.randn(m, r, generator=gen))
    v = _orth(torch.randn(n, r, generator=gen))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    w = (u * s) @ v.T
    noise = 0.8 * s[-1] / (math.sqrt(m) + math.sqrt(n))
    w += noise * torch.randn(m, n, generator=gen)
    return w * (0.02 / float(w.square().mean().sqrt()))  # entries ~0.02, as trained weights


def write_model(path: Path, c: dict, layers: int, seed: int, layers_per_shard: int) -> None:
    """A sharded bf16 checkpoint: embeddings, norms, the seven projections per layer."""
    path.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    c = {**c, "head_dim": c["hidden"] // c["heads"]}
    gen = torch.Generator().manual_seed(seed)
    base = {role: spectral(*shape(c), gen).bfloat16() for role, (_, shape) in ROLES.items()}
    weight_map: dict[str, str] = {}
    shards = [list(range(i, min(i + layers_per_shard, layers)))
              for i in range(0, layers, layers_per_shard)]  # fmt: skip
    n_files = len(shards) + 1
    for s_idx, shard_layers in enumerate(shards):
        tensors = {}
        for layer in shard_layers:
            pre = f"model.layers.{layer}."
            for role, (suffix, _) in ROLES.items():
                w = base[role]
                rows = torch.randperm(w.shape[0], generator=gen)
                cols = torch.randperm(w.shape[1], generator=gen)
                sign = (torch.randint(0, 2, (w.shape[0], 1), generator=gen) * 2 - 1).bfloat16()
                tensors[pre + suffix + ".weight"] = (w[rows][:, cols] * sign).contiguous()
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[pre + norm + ".weight"] = (
                    1 + 0.1 * torch.randn(c["hidden"], generator=gen)
                ).bfloat16()
        name = f"model-{s_idx + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    last = {
        "model.embed_tokens.weight": 0.02 * torch.randn(c["vocab"], c["hidden"], generator=gen),
        "lm_head.weight": 0.02 * torch.randn(c["vocab"], c["hidden"], generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(c["hidden"], generator=gen),
    }
    name = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file({k: v.bfloat16() for k, v in last.items()}, path / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(last, name))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (path / "config.json").write_text(json.dumps(hf_config(c, layers), indent=1))


def write_adapter(path: Path, c: dict, layers: int, seed: int, r: int = 16) -> None:
    """A rank-r PEFT LoRA adapter on all seven modules of the first ``layers`` layers."""
    from safetensors.torch import save_file

    c = {**c, "head_dim": c["hidden"] // c["heads"]}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for _, (suffix, shape) in ROLES.items():
            out_f, in_f = shape(c)
            key = f"base_model.model.model.layers.{layer}.{suffix}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / in_f**0.5
            tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(out_f, r, generator=gen)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "target_modules": [s.rsplit(".", 1)[-1] for s, _ in ROLES.values()],
        "layers_to_transform": list(range(layers)), "layers_pattern": "layers",
        "base_model_name_or_path": "synthetic", "inference_mode": True,
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))


# --- one measured transfer, in its own process ----------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that over
    ``exec`` from the forked copy of the parent, so a child would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(int(args.threads))
    start = time.perf_counter()
    import peft  # noqa: F401  (writing the adapter config imports it: timed apart)

    from crosslora import TransferOptions, transfer

    imports = time.perf_counter() - start

    options = TransferOptions(method="cross-lora", svd=args.svd, cache=args.cache_dir is not None,
                              cache_dir=args.cache_dir, device=args.device)  # fmt: skip
    start = time.perf_counter()
    report = transfer(args.adapter, args.src, args.tgt, args.out, options, overwrite=True,
                      progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    rss = peak_rss_mb()
    print(json.dumps({"seconds": round(seconds, 2), "imports_seconds": round(imports, 2),
                      "compute_seconds": report["summary"]["seconds"],
                      "peak_rss_mb": round(rss),
                      **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)}
                         if args.device.startswith("cuda") else {}),
                      "basis_cache": report.get("basis_cache"),
                      "transferred": report["summary"]["transferred"],
                      "modules": [[m["role"], m["source_shape"], m["target_shape"], m["seconds"]]
                                  for m in report["modules"]]}))  # fmt: skip


def measure(adapter: Path, src: Path, tgt: Path, out: Path, svd: str,
            cache_dir: Path | None) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "child", "--adapter", str(adapter), "--src", str(src),
           "--tgt", str(tgt), "--out", str(out), "--svd", svd, "--device", DEVICE]  # fmt: skip
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    if THREADS:
        cmd += ["--threads", str(THREADS)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # at start, at end
    print(f"  {out.name}: { {k: v for k, v in result.items() if k != 'modules'} }", flush=True)
    return result


def delta_errors(fast_dir: Path, exact_dir: Path) -> dict:
    """Relative ‖ΔW_fast − ΔW_exact‖ / ‖ΔW_exact‖ per module, from the factors (float64)."""
    from safetensors.torch import load_file

    f, e = (load_file(d / "adapter_model.safetensors") for d in (fast_dir, exact_dir))
    errs, num, den = {}, 0.0, 0.0
    for key in sorted(k for k in e if ".lora_A." in k):
        mod = key.removesuffix(".lora_A.weight")
        a1, b1 = f[key].double(), f[f"{mod}.lora_B.weight"].double()
        a2, b2 = e[key].double(), e[f"{mod}.lora_B.weight"].double()

        def inner(ba, aa, bb, ab):
            return float(((ba.T @ bb) * (aa @ ab.T)).sum())

        ee, ff, fe = inner(b2, a2, b2, a2), inner(b1, a1, b1, a1), inner(b1, a1, b2, a2)
        diff = max(ee + ff - 2 * fe, 0.0)
        errs[mod.split("layers.", 1)[1]] = math.sqrt(diff / ee)
        num, den = num + diff, den + ee
    values = sorted(errs.values())
    return {"overall": math.sqrt(num / den), "max": values[-1],
            "median": values[len(values) // 2], "per_module": errs}  # fmt: skip


def pivot_gap(u: torch.Tensor) -> float:
    """Smallest relative gap between the two largest |entries| over ``u``'s columns: the
    margin of ``linalg.fix_signs`` (largest-magnitude entry positive). Below the SVD's own
    round-off (~1e-4 in float32) a column's sign, and the paper method's ΔW, is a coin toss."""
    top = u.abs().topk(2, dim=0).values
    return float(((top[0] - top[1]) / top[0]).min())


def sign_ties(src: Path, tgt: Path, adapter: Path, module: str, k: int = 320) -> dict:
    """Why a module's fast ΔW differs from the exact one: the same exact cross-lora transfer of
    that module at 1 and at 2 torch threads (float32, as the CLI runs it), and the sign
    convention's margin on each base's exact bases. When the exact path disagrees with itself
    as much as with the fast path, the difference is the method's sign convention meeting a
    near-tie, not the fast SVD."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from crosslora.linalg import svd_bases

    def weight(root: Path) -> torch.Tensor:
        name = f"model.layers.{module}.weight"
        shard = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(root / shard[name], "pt") as f:
            return f.get_tensor(name).float()

    ws, wt = weight(src), weight(tgt)
    factors = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.model.layers.{module}"
    a, b = factors[f"{key}.lora_A.weight"], factors[f"{key}.lora_B.weight"]
    ku, kv = min(k, ws.shape[0], wt.shape[0]), min(k, ws.shape[1], wt.shape[1])
    deltas, threads = [], torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        us, _, vs = svd_bases(ws, ku, kv, "exact")
        ut, _, vt = svd_bases(wt, ku, kv, "exact")
        deltas.append((ut @ (us.T @ b)).double() @ ((a @ vs) @ vt.T).double())
    torch.set_num_threads(threads)
    diff = float((deltas[0] - deltas[1]).norm() / deltas[1].norm())
    return {"exact_1_vs_2_threads": diff,
            "sign_pivot_gap": {"source": pivot_gap(us), "target": pivot_gap(ut)}}  # fmt: skip


def run_size(size: str, work: Path, layers: int, exact_layers: int, shard_layers: int) -> dict:
    src_c, tgt_c = SIZES[size]
    root = work / size
    src, tgt = root / "source", root / "target"
    t0 = time.perf_counter()
    print(f"[{size}] writing synthetic checkpoints ({layers} layers each) ...", flush=True)
    write_model(src, src_c, layers, seed=1, layers_per_shard=shard_layers)
    write_model(tgt, tgt_c, layers, seed=2, layers_per_shard=shard_layers)
    gen_seconds = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    res: dict = {"source": src_c, "target": tgt_c, "layers": layers,
                 "checkpoint_gb": round(disk / 1e9, 2),
                 "generate_seconds": round(gen_seconds)}  # fmt: skip
    outs = root / "out"
    if exact_layers > 0:
        res["exact_vs_fast"] = exact_vs_fast(root, src, tgt, src_c, exact_layers)
    # cold and warm cache, and depth: 1, 2, 4, ... layers
    depths = DEPTHS or sorted({d for d in (1, 2, 4, 8, 16, 32) if d <= layers} | {layers})
    res["by_layers"] = {}
    for d in depths:
        ad, cache = root / f"adapter-{d}", root / f"cache-{d}"
        write_adapter(ad, src_c, d, seed=3)
        print(f"[{size}] fast, {d} layer(s): cold cache, then warm ...", flush=True)
        cold = measure(ad, src, tgt, outs / f"cold-{d}", "fast", cache)
        warm = measure(ad, src, tgt, outs / f"warm-{d}", "fast", cache)
        res["by_layers"][d] = {"cold": cold, "warm": warm}
        shutil.rmtree(cache, ignore_errors=True)
    return res


def exact_vs_fast(root: Path, src: Path, tgt: Path, src_c: dict, exact_layers: int) -> dict:
    """One cold transfer of the first ``exact_layers`` layers with exact and with fast SVD (no
    cache): times, their ratio, the fast adapter's ΔW error, and why a module is past 1e-2."""
    outs, ad = root / "out", root / f"adapter-{exact_layers}"
    write_adapter(ad, src_c, exact_layers, seed=3)
    print(f"[exact vs fast on {exact_layers} layer(s)] ...", flush=True)
    exact = measure(ad, src, tgt, outs / "exact", "exact", None)
    fast = measure(ad, src, tgt, outs / "fast", "fast", None)
    res = {
        "layers": exact_layers, "exact": exact, "fast": fast,
        "speedup": round(exact["compute_seconds"] / fast["compute_seconds"], 2),
        "delta_w_error": delta_errors(outs / "fast", outs / "exact"),
    }  # fmt: skip
    errors = res["delta_w_error"]["per_module"]
    res["sign_ties"] = {
        mod: sign_ties(src, tgt, ad, mod) for mod, err in errors.items() if err > 1e-2
    }  # modules past the 1e-2 goal: is it the fast path, or exact disagreeing with itself?
    for mod, tie in res["sign_ties"].items():
        print(f"  {mod}: fast vs exact {errors[mod]:.2e}; {tie}", flush=True)
    return res


def matrices(size: str, k: int = 320) -> dict:
    """Exact vs fast ``svd_bases`` on one weight of every distinct shape of a size's pair (bf16
    weights with the synthetic spectrum, read as float32): seconds, speedup, and how far the
    fast bases are from the exact ones (largest column deviation, signs included: a flipped
    column counts as 2; and the largest principal angle)."""
    from crosslora.linalg import FastSvd, svd_bases

    gen = torch.Generator().manual_seed(7)
    shapes = sorted({shape({**c, "head_dim": c["hidden"] // c["heads"]})
                     for c in SIZES[size] for _, shape in ROLES.values()})  # fmt: skip
    out = {}
    for m, n in shapes:
        w = spectral(m, n, gen).bfloat16().float()
        kk = min(k, m, n)
        t = time.perf_counter()
        ue, _, ve = svd_bases(w, kk, kk, "exact")
        exact = time.perf_counter() - t
        t = time.perf_counter()
        uf, _, vf = svd_bases(w, kk, kk, "fast")
        fast = time.perf_counter() - t
        dev = max(float((ue - uf).norm(dim=0).max()), float((ve - vf).norm(dim=0).max()))
        ue, uf = ue.double(), uf.double()
        sine = torch.linalg.matrix_norm(uf - ue @ (ue.T @ uf), ord=2).clamp(max=1)
        out[f"{m}x{n}"] = {"k": kk, "fast_path": FastSvd().applies((m, n), kk),
                           "exact_s": round(exact, 2), "fast_s": round(fast, 2),
                           "speedup": round(exact / fast, 2), "max_column_deviation": dev,
                           "max_principal_angle": float(torch.arcsin(sine))}  # fmt: skip
        print(f"  {m}x{n}: {out[f'{m}x{n}']}", flush=True)
    return out


def summary(results: dict) -> str:
    lines = ["| size | layers | exact s (compute) | fast s (compute) | speedup | "
             "ΔW err (overall / max) | "
             "peak RSS exact / fast MB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in results["sizes"].items():
        if "exact_vs_fast" not in r:
            continue
        e = r["exact_vs_fast"]
        d = e["delta_w_error"]
        lines.append(f"| {size} | {e['layers']} | {e['exact']['seconds']} "
                     f"({e['exact']['compute_seconds']}) | {e['fast']['seconds']} "
                     f"({e['fast']['compute_seconds']}) | {e['speedup']}x | "
                     f"{d['overall']:.1e} / {d['max']:.1e} | "
                     f"{e['exact']['peak_rss_mb']} / {e['fast']['peak_rss_mb']} |")  # fmt: skip
    lines += ["", "| size | layers | cold fast s (compute) | warm s (compute) | cache hits | "
              "peak RSS cold / warm MB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in results["sizes"].items():
        for d, m in r["by_layers"].items():
            lines.append(f"| {size} | {d} | {m['cold']['seconds']} "
                         f"({m['cold']['compute_seconds']}) | {m['warm']['seconds']} "
                         f"({m['warm']['compute_seconds']}) | "
                         f"{m['warm']['basis_cache']['hits']} | {m['cold']['peak_rss_mb']} / "
                         f"{m['warm']['peak_rss_mb']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        p = argparse.ArgumentParser()
        names = "--adapter --src --tgt --out --svd --cache-dir --threads --device"
        for name in names.split():
            p.add_argument(name)
        return child(p.parse_args(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", action="append", choices=sorted(SIZES),
                   help="model shapes (repeatable; default 1b)")  # fmt: skip
    p.add_argument("--layers", type=int, default=4, help="layers per synthetic model")
    p.add_argument("--exact-layers", type=int, default=1,
                   help="layers for exact vs fast (0: skip it)")  # fmt: skip
    p.add_argument("--depths", default="", help="layer counts for the depth curve, e.g. 1,4 "
                   "(default: 1, 2, 4, ... up to --layers)")  # fmt: skip
    p.add_argument("--layers-per-shard", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/crosslora-perf"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in each measured transfer (default: torch's own; "
                   "1 keeps LAPACK from collapsing on a shared, busy CPU)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the transfers compute (cpu, cuda)")
    p.add_argument("--results", type=Path, default=Path("/tmp/crosslora-perf.json"))
    p.add_argument("--matrices", action="store_true",
                   help="only time exact vs fast bases on one matrix of each shape (no "
                   "checkpoints, no transfers)")  # fmt: skip
    args = p.parse_args()
    if args.matrices:
        if args.threads:
            torch.set_num_threads(args.threads)
        res = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "torch_threads": torch.get_num_threads(),
               "load_1min_at_start": round(os.getloadavg()[0], 2),
               "matrices": {size: matrices(size) for size in args.size or ["7b"]},
               "load_1min_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
        args.results.write_text(json.dumps(res, indent=2) + "\n")
        print(f"results: {args.results}")
        return None
    sizes = args.size or ["1b"]
    global THREADS, DEPTHS, DEVICE
    THREADS, DEVICE = args.threads, args.device
    DEPTHS = sorted({min(int(d), args.layers) for d in args.depths.split(",") if d})
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch_threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
        "device": args.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_1min_at_start": round(os.getloadavg()[0], 2), "sizes": {},
    }  # fmt: skip
    try:
        for size in sizes:
            results["sizes"][size] = run_size(size, args.work, args.layers, args.exact_layers,
                                              args.layers_per_shard)  # fmt: skip
            results["load_1min_at_end"] = round(os.getloadavg()[0], 2)
            args.results.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(summary(results))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
