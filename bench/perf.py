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

``--matched`` measures the default method instead (layer-streamed: each model samples the probe
text in its checkpoint's dtype, whole where it fits, then both read it one decoder layer at a time
in float32):

    .venv/bin/python bench/perf.py --matched --size 7b --depths 4,8,32:1 --threads 2 \
        --results bench/perf_matched_results.json
    .venv/bin/python bench/perf.py --matched --threads 1 --rescore bench/perf_matched_results.json
    .venv/bin/python bench/perf.py --matched --size smoke --depths 1,2 --threads 2  # a check

(``32:1``: the 32-layer pair with an adapter on its first layer. Sampling, reading and the
calibration run over every layer whatever the adapter covers; the fits are per adapted layer, about
3.5 min each at 7B on 2 cores, so all 32 would take about 2 h: the time with every layer adapted
is this run's plus its fits per layer for the rest, ``seconds_all_adapted``.)

- both models get the source's vocabulary (32000 at 7B: Mistral's 32768 would need another
  tokenizer) and the same fast word-level tokenizer (``write_tokenizer``), so every position
  aligns; the checkpoints are written once at the deepest depth and each depth is a hard-linked
  view of its first layers (``depth_view``);
- per depth, one transfer through the Python API in its own process with a reduced probe
  (``--probe``, default ``REDUCED_PROBE``; with random weights only the probe's size matters
  here, not what it says): wall time, peak RSS
  (``VmHWM``) overall and per phase (sampling, reading, fits, calibration; the peak is reset
  between phases), against the plan's estimate (``plan_transfers``: ``Matched.memory``) and its
  phases;
- the full default probe's time, extrapolated from each reduced run (``extrapolate``: two
  models, labelled as estimates), beside the plan's own time estimate; ``--full-probe-layers``
  also measures the full probe at some depths;
- the plan's estimate for the default probe on header-only checkpoints (``--estimates``: 7B and
  a Llama-2-70B -> Llama-3-70B pair; sparse files, no disk used), on the CPU and with
  ``cuda`` named as the device (nothing allocated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3: Llama's unk, bos, eos, and a pad


def hf_config(c: dict, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM" if c["model_type"] == "llama" else
                          "MistralForCausalLM"],
        "model_type": c["model_type"], "hidden_size": c["hidden"],
        "intermediate_size": c["inter"], "num_hidden_layers": layers,
        "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"],
        "head_dim": c["hidden"] // c["heads"], "vocab_size": c["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu", "rope_theta": c.get("rope_theta", 1e4),
        # the ids of the tokenizer ``write_tokenizer`` saves beside the weights (Llama's)
        "bos_token_id": SPECIALS.index("<s>"), "eos_token_id": SPECIALS.index("</s>"),
        "pad_token_id": SPECIALS.index("<pad>"),
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


# --- the default method, matched (layer-streamed) -------------------------------------------

# the probe the measured runs use (the default is MatchedParams(): 64 texts, 32 of them for the
# calibration, 96 new tokens each, at least 256 aligned positions)
REDUCED_PROBE = {"n_texts": 4, "calibration_texts": 2, "text_tokens": 16, "min_positions": 16}
SKIP_TOKENS = 4  # crosslora.methods.matched.probe.SKIP_TOKENS: a text's first tokens never align

# header-only checkpoints for the plan's estimate (sparse files: nothing written, nothing read)
ESTIMATE_SIZES = {
    "7b": SIZES["7b"],  # Llama-2-7B -> Mistral-7B, as in SIZES (vocabularies 32000 -> 32768)
    "70b": (  # Llama-2-70B -> Llama-3-70B
        dict(model_type="llama", hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8,
             vocab=32000),
        dict(model_type="llama", hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8,
             vocab=128256, rope_theta=5e5),
    ),
}  # fmt: skip


def write_tokenizer(path: Path, vocab: int) -> None:
    """A fast word-level tokenizer of ``vocab`` entries: the specials (``SPECIALS``), then
    ``w4`` ... ``w<vocab-1>`` split on whitespace, a BOS in front of every text (as Llama's and
    Mistral's). Decoding joins words with spaces, so a sampled text encodes back to its ids with
    character offsets. The same one goes beside both models: every position aligns."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {s: i for i, s in enumerate(SPECIALS)} | {
        f"w{i}": i for i in range(len(SPECIALS), vocab)
    }
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIALS.index("<s>"))]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    ).save_pretrained(path)  # fmt: skip


def shard_shapes(c: dict, layers: int, layers_per_shard: int) -> list[list[tuple[str, tuple]]]:
    """The tensors ``write_model`` writes, shard by shard, as (name, shape)."""
    c = {**c, "head_dim": c["hidden"] // c["heads"]}
    shards = []
    for lo in range(0, layers, layers_per_shard):
        names = []
        for layer in range(lo, min(lo + layers_per_shard, layers)):
            pre = f"model.layers.{layer}."
            names += [(pre + suffix + ".weight", shape(c)) for suffix, shape in ROLES.values()]
            names += [(pre + n + ".weight", (c["hidden"],))
                      for n in ("input_layernorm", "post_attention_layernorm")]  # fmt: skip
        shards.append(names)
    shards.append([("model.embed_tokens.weight", (c["vocab"], c["hidden"])),
                   ("lm_head.weight", (c["vocab"], c["hidden"])),
                   ("model.norm.weight", (c["hidden"],))])  # fmt: skip
    return shards


def write_header_only(path: Path, c: dict, layers: int, layers_per_shard: int = 4) -> None:
    """A sharded bf16 checkpoint of ``write_model``'s tensors whose data is a hole: each file is
    a safetensors header (the format's 8-byte length, JSON padded to 8 bytes) and is then
    extended to its full size with ``os.truncate`` (sparse, no disk used). Headers and configs
    read as a real checkpoint's; the weights read as zeros. With the tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    shards = shard_shapes(c, layers, layers_per_shard)
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in tensors:
            nbytes = 2 * math.prod(shape)
            header[key] = {"dtype": "BF16", "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
        os.truncate(path / name, 8 + len(raw) + offset)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (path / "config.json").write_text(json.dumps(hf_config(c, layers), indent=1))
    write_tokenizer(path, c["vocab"])


def check_loads(path: Path) -> dict:
    """That transformers reads the folder as written: ``AutoModelForCausalLM`` from its
    config.json (built on the meta device, nothing allocated) has the checkpoint's tensors with
    the checkpoint's shapes, and ``AutoTokenizer`` gives a fast tokenizer whose bos/eos/pad ids
    are the config's and whose vocabulary fits the embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from crosslora.io.checkpoint import Checkpoint

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ckpt = Checkpoint(path)
    stored = {k: tuple(ckpt.shape(k)) for k in ckpt.keys()}
    tok = AutoTokenizer.from_pretrained(path)
    ids = {n: getattr(tok, f"{n}_token_id") for n in ("bos", "eos", "pad")}
    out = {"class": type(model).__name__, "parameters": sum(math.prod(s) for s in shapes.values()),
           "same_tensors": shapes == stored, "tokenizer_fast": bool(tok.is_fast),
           "tokenizer_ids_match_config": all(getattr(config, f"{n}_token_id") == i
                                             for n, i in ids.items()),
           "tokenizer_fits_vocab": len(tok) <= config.vocab_size}  # fmt: skip
    if not all(v for k, v in out.items() if k not in ("class", "parameters")):
        raise SystemExit(f"{path}: transformers does not read it as written: {out}")
    return out


def depth_view(full: Path, view: Path, layers: int) -> None:
    """``full``'s first ``layers`` decoder layers as a checkpoint of its own: the shards that
    hold them hard-linked (no disk), an index of their tensors, the config cut to ``layers``, the
    tokenizer."""
    view.mkdir(parents=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]

    def kept(name: str) -> bool:
        return not name.startswith("model.layers.") or int(name.split(".")[2]) < layers

    weight_map = {k: v for k, v in index.items() if kept(k)}
    for shard in sorted(set(weight_map.values())):
        os.link(full / shard, view / shard)
    (view / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    config = json.loads((full / "config.json").read_text())
    (view / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=1))
    for f in full.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, view / f.name)


def positions(probe: dict) -> int:
    """The aligned positions a probe gives with one tokenizer on both sides: every token of every
    text after the first ``SKIP_TOKENS`` (the BOS among them)."""
    return probe["n_texts"] * (probe["text_tokens"] + 1 - SKIP_TOKENS)


class Phases:
    """Wall time and peak RSS per phase of one matched transfer: ``mark(name)`` closes the phase
    that ran since the last mark. The peak is reset at each mark (``/proc/self/clear_refs``, 5),
    so each phase has its own; where that cannot be written, peaks are cumulative."""

    def __init__(self) -> None:
        self.out: dict[str, dict] = {}
        self.reset = self._reset()
        self.t = time.perf_counter()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        ph = self.out.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0})
        ph["seconds"] = round(ph["seconds"] + now - self.t, 2)
        ph["peak_rss_mb"] = max(ph["peak_rss_mb"], round(peak_rss_mb()))
        self._reset()
        self.t = time.perf_counter()


def child_matched(args: argparse.Namespace) -> None:
    """One matched transfer through the Python API, timed and measured per phase: sampling
    (``probe_texts``: each model whole, as stored), reading (aligning the texts and
    ``_read_probe``: both models one layer at a time), fits (the modules' ``transfer``, up to the
    calibration), calibration, writing (the output); planning is what comes before sampling."""
    if args.threads:
        torch.set_num_threads(int(args.threads))
    start = time.perf_counter()
    import peft  # noqa: F401

    import crosslora.methods.matched as matched
    from crosslora import MatchedParams, TransferOptions, transfer

    imports = time.perf_counter() - start
    import crosslora.methods.matched.sampling as sampling

    phases = Phases()
    whole: list[bool] = []  # per model sampled: whole, or one layer at a time
    decide = sampling.samples_whole

    def samples_whole(*a, **k):
        whole.append(decide(*a, **k))
        return whole[-1]

    sampling.samples_whole = samples_whole
    probe_texts, read_probe, calibrate = (
        matched.probe_texts, matched.Matched._read_probe, matched.Matched.calibrate
    )  # fmt: skip

    def timed_probe_texts(*a, **k):
        phases.mark("planning")
        out = probe_texts(*a, **k)
        phases.mark("sampling")
        return out

    def timed_read_probe(self, *a, **k):
        out = read_probe(self, *a, **k)
        phases.mark("reading")
        return out

    def timed_calibrate(self, *a, **k):
        phases.mark("fits")
        out = calibrate(self, *a, **k)
        phases.mark("calibration")
        return out

    matched.probe_texts = timed_probe_texts
    matched.Matched._read_probe = timed_read_probe
    matched.Matched.calibrate = timed_calibrate
    options = TransferOptions(method="matched", params=MatchedParams(**json.loads(args.probe)),
                              cache=False, device=args.device)  # fmt: skip
    start = time.perf_counter()
    report = transfer(args.adapter, args.src, args.tgt, args.out, options, overwrite=True,
                      progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    phases.mark("writing")
    diag = report["method_diagnostics"]
    print(json.dumps({"seconds": round(seconds, 2), "imports_seconds": round(imports, 2),
                      "peak_rss_mb": max(p["peak_rss_mb"] for p in phases.out.values()),
                      "phases": phases.out, "per_phase_peaks": phases.reset,
                      "sampled_whole": whole,
                      "transferred": report["summary"]["transferred"],
                      **{k: diag.get(k) for k in ("probe_texts", "probe_positions",
                                                  "probe_tokens_source", "probe_tokens_target",
                                                  "probe_chunks")},
                      "probe_effect": diag.get("probe_effect")}))  # fmt: skip


def measure_matched(adapter: Path, src: Path, tgt: Path, out: Path, probe: dict) -> dict:
    cmd = [sys.executable, __file__, "child-matched", "--adapter", str(adapter), "--src",
           str(src), "--tgt", str(tgt), "--out", str(out), "--probe", json.dumps(probe),
           "--device", DEVICE]  # fmt: skip
    env = dict(os.environ)
    if THREADS:
        cmd += ["--threads", str(THREADS)]
        env["OMP_NUM_THREADS"] = str(THREADS)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # at start, at end
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {out.name}: {json.dumps(result)}", flush=True)
    return result


PHASES = ("sampling", "reading", "fits", "calibration")


def estimate(adapter: Path, src: Path, tgt: Path, probe: dict | None) -> dict:
    """The plan's estimate on the CPU for this pair and probe (None: the default probe), as the
    transfer computes it (``plan_transfers``: ``Matched.memory``, and the time from the work's
    floating-point operations and this machine's measured speed at this process's threads), and
    the work per phase (``phase_flops``)."""
    from crosslora import MatchedParams, TransferOptions, plan_transfers

    params = MatchedParams(**probe) if probe else MatchedParams()
    options = TransferOptions(method="matched", params=params, cache=False, device="cpu")
    (inputs,), (plan,) = plan_transfers([str(adapter)], str(src), str(tgt), options)
    return {**need_dict(plan.memory), "plan_seconds": round(plan.seconds, 1),
            "phase_flops": phase_flops(inputs.src, inputs.tgt, plan.tasks, params)}  # fmt: skip


def phase_flops(src, tgt, tasks: list, p) -> dict:
    """``Matched.flops`` split by phase, the parts that grow with the probe only: sampling and
    reading ∝ texts × tokens, calibration ∝ calibration texts × tokens, the fits' Gram products
    ∝ positions (their factorisations, O(n³) per layer, do not grow with the probe and are not
    counted here)."""
    from crosslora.memory import parameter_bytes
    from crosslora.methods.matched import SAMPLED_PER_KEPT, distinct_fits

    w_s, w_t = parameter_bytes(src.checkpoint, 1), parameter_bytes(tgt.checkpoint, 1)
    tokens = p.n_texts * p.text_tokens
    return {
        "sampling": 2 * (w_s + w_t) * tokens / 2 * SAMPLED_PER_KEPT,
        "reading": 2 * (w_s + w_t) * tokens,
        "fits": sum(2 * tokens * m * n for m, n in distinct_fits(src, tgt, tasks)),
        "calibration": 2 * (2 * w_s + 11 * w_t) * p.calibration_texts * p.text_tokens,
    }


def need_dict(need) -> dict:
    from crosslora.methods.matched import RUNTIME_BYTES

    found = dict(re.findall(r"(sampling|reading|fits|calibration) ([\d.]+) GB", need.what))
    return {"host_gb": round(need.host / 1e9, 2), "device_gb": round(need.device / 1e9, 2),
            "disk_gb": round(need.disk / 1e9, 2), "what": need.what,
            "runtime_gb": round(RUNTIME_BYTES / 1e9, 2),
            "phases_gb": {k: float(v) for k, v in found.items()}}  # fmt: skip


# how the model that samples the probe text is held: whole where it fits in what is free on the
# device now (``sampling.samples_whole``), else one layer at a time; the estimate says which
SAMPLING = {"sampling whole": True, "sampling by layer": False}


@contextmanager
def _sampling(whole: bool) -> Iterator[None]:
    """``Matched.memory`` as for a device where the models sample whole (or do not)."""
    import crosslora.methods.matched as matched

    decide = matched.samples_whole
    matched.samples_whole = lambda *_: whole
    try:
        yield
    finally:
        matched.samples_whole = decide


def header_estimates(work: Path, sizes: list[str]) -> dict:
    """``Matched().memory`` (the default probe) on header-only checkpoints of each size's pair,
    for the CPU and for a GPU (``cuda`` is only named: nothing is allocated); and one float64
    n × n matrix of the widest input space a ridge fit factorises (``widest_ridge_gb``)."""
    from crosslora.arch.layout import Layout
    from crosslora.io.checkpoint import Checkpoint
    from crosslora.methods.matched import Matched
    from crosslora.methods.matched.probe import input_widths

    out = {}
    for size in sizes:
        root = work / f"headers-{size}"
        src_c, tgt_c = ESTIMATE_SIZES[size]
        write_header_only(root / "source", src_c, src_c["layers"])
        write_header_only(root / "target", tgt_c, tgt_c["layers"])
        used = sum(p.stat().st_blocks * 512 for p in root.rglob("*.safetensors"))
        size_b = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
        checks = {side: check_loads(root / side) for side in ("source", "target")}
        layouts = [Layout(Checkpoint(root / side, f"{side} model"), f"{side} model")
                   for side in ("source", "target")]  # fmt: skip
        widest = max(n for layout in layouts for n in input_widths(layout).values())
        method = Matched()
        out[size] = {"source": src_c, "target": tgt_c, "checkpoint_gb": round(size_b / 1e9, 1),
                     "disk_used_mb": round(used / 1e6, 1), "loads": checks,
                     "widest_ridge_gb": round(8 * widest**2 / 1e9, 2)}  # fmt: skip
        for dev in ("cpu", "cuda"):
            for how, whole in SAMPLING.items():  # whole where it fits: either, named
                with _sampling(whole):
                    need = method.memory(*layouts, torch.device(dev))
                out[size][f"{dev}, {how}"] = x = need_dict(need)
                print(f"[{size} estimate] {dev}, {how}: host {x['host_gb']} GB, device "
                      f"{x['device_gb']} GB, disk {x['disk_gb']} GB ({x['what']})",
                      flush=True)  # fmt: skip
        print(f"[{size} estimate] {size_b / 1e9:.0f} GB of checkpoints in {used / 1e6:.1f} MB "
              "of disk", flush=True)  # fmt: skip
        shutil.rmtree(root)
    return out


UNITS = {  # the brief rule: what each phase's time is proportional to
    "sampling": lambda p: p["n_texts"] * p["text_tokens"],
    "reading": lambda p: p["n_texts"] * p["text_tokens"],
    "fits": positions,
    "calibration": lambda p: p["calibration_texts"] * p["text_tokens"],
}


def extrapolate(run: dict, reduced: dict, full: dict, rate: float) -> dict:
    """The full probe's time from a reduced run with all ``run["layers"]`` layers adapted, per
    phase, two ways (planning and writing as measured in both):

    - ``proportional``: the measured time scaled by the phase's units of work (``UNITS``):
      sampling and reading ∝ texts × tokens, calibration ∝ calibration texts × tokens, fits ∝
      aligned positions. Right where the work is all compute; at a reduced probe a phase's time
      is mostly what does not grow with it (reading each layer's weights, the fits' O(n³)
      factorisations, batch-2 sampling bound by reading the weights), so this overstates;
    - ``fixed_plus_work``: the measured time (taken as the part that does not grow with the
      probe) plus the extra work of the full probe (``phase_flops``, full minus reduced) at
      ``rate`` FLOP/s (crosslora.speed: 0.7 of a 512 × 512 product's rate here, as the plan's).

    With fewer layers adapted than the model has, the fits are scaled to all of them."""
    adapted = run["adapted_layers"]
    per_layer = run["layers"] / adapted  # the fits of one adapted layer, times the layers
    est = run["estimate"]["phase_flops"]
    est_full = run["estimate_full_probe"]["phase_flops"]
    out: dict = {"proportional": {}, "fixed_plus_work": {}}
    for name, ph in run["phases"].items():
        grow = per_layer if name == "fits" else 1.0
        s = ph["seconds"] * grow
        ratio = UNITS[name](full) / UNITS[name](reduced) if name in UNITS else 1.0
        # est_full is the plan's with every layer adapted, est with the run's adapter
        extra = est_full.get(name, 0) - est.get(name, 0) * grow
        out["proportional"][name] = round(s * ratio, 1)
        out["fixed_plus_work"][name] = round(s + extra / rate, 1)
    return {k: {"phases": v, "seconds": round(sum(v.values()))} for k, v in out.items()}


def from_full_run(full_run: dict, small: dict, deep: dict) -> dict:
    """The full probe's time at ``deep``'s depth from a measured full-probe run at ``small``'s
    depth: each phase's full-probe time times that phase's growth with depth in the reduced
    runs (``deep`` / ``small``)."""
    phases = {}
    for name, ph in full_run["phases"].items():
        grow = deep["phases"][name]["seconds"] / max(small["phases"][name]["seconds"], 1e-3)
        if name == "fits":
            grow *= (deep["layers"] / deep["adapted_layers"]) / (
                small["layers"] / small["adapted_layers"]
            )
        phases[name] = round(ph["seconds"] * grow, 1)
    return {"phases": phases, "seconds": round(sum(phases.values()))}


def run_matched(size: str, work: Path, depths: list[tuple[int, int]], probe: dict,
                full_depths: list[int], shard_layers: int) -> dict:  # fmt: skip
    """The depth curve of matched transfers (``probe``) at ``size``'s shapes: per (layers,
    adapted layers) of ``depths``, checkpoints of that many layers and an adapter on the first
    adapted ones; and the full probe at ``full_depths`` (all adapted). Both models get the
    source's vocabulary size and one tokenizer."""
    from crosslora.speed import EFFICIENCY, matmul_flops

    src_c, tgt_c = SIZES[size]
    tgt_c = {**tgt_c, "vocab": src_c["vocab"]}  # one tokenizer for both: the same ids
    root = work / f"matched-{size}"
    deepest = max([d for d, _ in depths] + full_depths)
    t0 = time.perf_counter()
    print(f"[{size} matched] writing synthetic checkpoints ({deepest} layers each) ...",
          flush=True)  # fmt: skip
    for side, c, seed in (("source", src_c, 1), ("target", tgt_c, 2)):
        write_model(root / side, c, deepest, seed=seed, layers_per_shard=shard_layers)
        write_tokenizer(root / side, c["vocab"])
    disk = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    full = {k: getattr(_default_params(), k) for k in probe}
    res: dict = {"source": src_c, "target": tgt_c, "probe": probe, "full_probe": full,
                 "checkpoint_gb": round(disk / 1e9, 2),
                 "generate_seconds": round(time.perf_counter() - t0),
                 "loads": {side: check_loads(root / side) for side in ("source", "target")},
                 "by_layers": {}, "full_probe_by_layers": {}}  # fmt: skip
    runs = [(d, a, probe, "by_layers") for d, a in depths]
    runs += [(d, d, full, "full_probe_by_layers") for d in full_depths]
    for d, a, p, into in runs:
        view = root / f"layers-{d}"
        if not view.exists():
            for side in ("source", "target"):
                depth_view(root / side, view / side, d)
        adapter = view / f"adapter-{a}"
        if not adapter.exists():
            write_adapter(adapter, src_c, a, seed=3)
        est = estimate(adapter, view / "source", view / "target", p)
        print(f"[{size} matched] {d} layer(s), adapter on {a}, probe {p}: estimate "
              f"{est['host_gb']} GB ({est['what']}); plan's time {est['plan_seconds']} s ...",
              flush=True)  # fmt: skip
        run = measure_matched(adapter, view / "source", view / "target", root / "out", p)
        run.update(layers=d, adapted_layers=a, seconds_per_layer=round(run["seconds"] / d, 2))
        run["estimate"] = est
        run["peak_over_estimate"] = round(run["peak_rss_mb"] / (1e3 * est["host_gb"]), 3)
        run["phase_peak_over_estimate"] = {
            k: round(run["phases"][k]["peak_rss_mb"] / (1e3 * (v + est["runtime_gb"])), 3)
            for k, v in est["phases_gb"].items()
            if k in run["phases"]
        }  # each phase's peak against that phase's estimate plus the runtime allowance
        if a < d:  # the fits of every layer: this run's per adapted layer, times the layers
            fits = run["phases"]["fits"]["seconds"]
            run["seconds_all_adapted"] = round(run["seconds"] + fits * (d - a) / a, 1)
        if into == "by_layers":  # the default probe at this depth, all layers adapted
            full_adapter = view / f"adapter-{d}"
            if not full_adapter.exists():
                write_adapter(full_adapter, src_c, d, seed=3)
            run["estimate_full_probe"] = estimate(full_adapter, view / "source",
                                                  view / "target", None)  # fmt: skip
            if a < d:
                shutil.rmtree(full_adapter)
        res[into][f"{d}" if a == d else f"{d}:{a}"] = run
    res["rate_flops"] = EFFICIENCY * matmul_flops(torch.device("cpu"))
    full_adapted = {r["layers"]: r for r in res["by_layers"].values()
                    if r["adapted_layers"] == r["layers"]}  # fmt: skip
    if len(full_adapted) > 1:
        lo, hi = min(full_adapted), max(full_adapted)
        res["seconds_per_layer_marginal"] = round(
            (full_adapted[hi]["seconds"] - full_adapted[lo]["seconds"]) / (hi - lo), 2
        )
    res["extrapolated_full_probe"] = {
        d: extrapolate(r, probe, full, res["rate_flops"]) for d, r in res["by_layers"].items()
    }
    deep = max(res["by_layers"].values(), key=lambda r: (r["layers"], r["adapted_layers"]))
    for d, full_run in res["full_probe_by_layers"].items():
        if d in res["by_layers"] and full_run["layers"] != deep["layers"]:
            res[f"full_probe_at_{deep['layers']}_from_{d}"] = from_full_run(
                full_run, res["by_layers"][d], deep
            )
    return res


def _default_params():
    from crosslora import MatchedParams

    return MatchedParams()


def summary_matched(results: dict) -> str:
    lines = []
    for size, r in results["matched"].items():
        p, f = r["probe"], r["full_probe"]
        lines += [f"### {size}: matched, reduced probe (n_texts={p['n_texts']}, "
                  f"calibration_texts={p['calibration_texts']}, text_tokens={p['text_tokens']}, "
                  f"min_positions={p['min_positions']}), {results['torch_threads']} torch "
                  f"thread(s), CPU", "",
                  "| layers (adapted) | wall s | s / layer | peak RSS MB | estimate GB (largest "
                  "phase) | peak / estimate | measured s, peak MB per phase (sampling / reading "
                  "/ fits / calibration) | estimate per phase GB | phase peak / (phase estimate "
                  "+ runtime) | plan's time s | sampled whole | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, rows in (("", r["by_layers"]), (", full probe", r["full_probe_by_layers"])):
            for m in rows.values():
                e = m["estimate"]
                per = " / ".join(f"{m['phases'][k]['seconds']} s, {m['phases'][k]['peak_rss_mb']}"
                                 for k in PHASES if k in m["phases"])  # fmt: skip
                est = " / ".join(str(e["phases_gb"].get(k)) for k in PHASES)
                ratios = " / ".join(str(m["phase_peak_over_estimate"].get(k)) for k in PHASES)
                largest = e["what"].split(":")[0].removeprefix("the largest phase, ")
                wall = f"{m['seconds']}" + (f" ({m['seconds_all_adapted']} with all adapted)"
                                            if "seconds_all_adapted" in m else "")  # fmt: skip
                lines.append(f"| {m['layers']} ({m['adapted_layers']}{kind}) | {wall} | "
                             f"{m['seconds_per_layer']} | {m['peak_rss_mb']} | {e['host_gb']} "
                             f"({largest}) | {m['peak_over_estimate']} | {per} | {est} "
                             f"(+{e['runtime_gb']} runtime) | {ratios} | {e['plan_seconds']} | "
                             f"{m['sampled_whole']} | "
                             f"{m['load_1min'][0]}-{m['load_1min'][1]} |")  # fmt: skip
        if "seconds_per_layer_marginal" in r:
            lines += [
                "",
                "Marginal time per layer (between the shallowest and deepest runs "
                f"with every layer adapted): {r['seconds_per_layer_marginal']} s.",
            ]
        versions = [{
            "rate_flops": r["rate_flops"], "extrapolated_full_probe": r["extrapolated_full_probe"],
            "plan_seconds_full_probe": {d: m["estimate_full_probe"]["plan_seconds"]
                                        for d, m in r["by_layers"].items()},
        }] + ([r["rescored"]] if "rescored" in r else [])  # fmt: skip
        for x in versions:
            when = (f"given to `--rescore` ({x['rate_from']})" if "rate_from" in x else
                    f"measured again by `--rescore` at {x['torch_threads']} torch thread(s), "
                    f"load {x['load_1min']}" if "load_1min" in x
                    else "measured by this run, at its first plan")  # fmt: skip
            lines += ["", f"**Estimated, not measured**: the full default probe (n_texts="
                      f"{f['n_texts']}, calibration_texts={f['calibration_texts']}, text_tokens="
                      f"{f['text_tokens']}), every layer adapted, from each reduced run "
                      "(`extrapolate`): *proportional* scales each phase by its work (sampling "
                      "and reading × texts × tokens, calibration × calibration texts × tokens, "
                      "fits × aligned positions); *fixed + work* keeps the measured time as the "
                      "part that does not grow with the probe and adds the full probe's extra "
                      f"floating-point work at {x['rate_flops'] / 1e9:.0f} GFLOP/s ({when}). The "
                      "plan's time is its own estimate of the full probe at that rate.", "",
                      "| layers (run) | model | sampling s | reading s | fits s | calibration s | "
                      "total | plan's time s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for d, ex in x["extrapolated_full_probe"].items():
                plan_s = x["plan_seconds_full_probe"][d]
                for model, y in ex.items():
                    lines.append(
                        f"| {r['by_layers'][d]['layers']} ({d}) | {model} | "
                        + " | ".join(str(y["phases"][k]) for k in PHASES)
                        + f" | {y['seconds']} s ({y['seconds'] / 3600:.1f} h) | {plan_s} |"
                    )
        for key, x in r.items():
            if key.startswith("full_probe_at_"):
                lines += ["", f"**Estimated** from the full probe measured at "
                          f"{key.rsplit('_', 1)[1]} layers, each phase grown as the reduced runs "
                          f"grow with depth ({key}): " + ", ".join(
                              f"{k} {x['phases'][k]} s" for k in PHASES) +
                          f"; total {x['seconds']} s ({x['seconds'] / 3600:.1f} h)."]  # fmt: skip
        deep = max(r["by_layers"].values(), key=lambda m: m["layers"])
        d, full_est = deep["layers"], deep["estimate_full_probe"]
        lines += ["", f"The plan's estimate for the full default probe at {d} layers (CPU): "
                  f"{full_est['host_gb']} GB of RAM, {full_est['disk_gb']} GB of disk "
                  f"({full_est['what']})."]  # fmt: skip
    lines += ["", "### The plan's estimate for the default probe (header-only checkpoints)", "",
              "| pair | device | host GB | device GB | disk GB | what |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for size, e in results.get("estimates", {}).items():
        for dev in ("cpu", "cuda"):
            for how in SAMPLING:
                x = e[f"{dev}, {how}"]
                lines.append(f"| {size} | {dev}, {how} | {x['host_gb']} | {x['device_gb']} | "
                             f"{x['disk_gb']} | {x['what']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        p = argparse.ArgumentParser()
        names = "--adapter --src --tgt --out --svd --cache-dir --threads --device"
        for name in names.split():
            p.add_argument(name)
        return child(p.parse_args(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "child-matched":
        p = argparse.ArgumentParser()
        for name in "--adapter --src --tgt --out --probe --threads --device".split():
            p.add_argument(name)
        return child_matched(p.parse_args(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", action="append", choices=sorted(SIZES),
                   help="model shapes (repeatable; default 1b)")  # fmt: skip
    p.add_argument("--layers", type=int, default=4, help="layers per synthetic model")
    p.add_argument("--exact-layers", type=int, default=1,
                   help="layers for exact vs fast (0: skip it)")  # fmt: skip
    p.add_argument("--depths", default="", help="layer counts for the depth curve, e.g. 1,4 "
                   "(default: 1, 2, 4, ... up to --layers; with --matched 4,8,32, and "
                   "LAYERS:ADAPTED runs a LAYERS-layer pair with an adapter on the first ADAPTED "
                   "layers, e.g. 32:1)")  # fmt: skip
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
    p.add_argument("--matched", action="store_true",
                   help="measure the default method (matched) instead: a reduced probe at "
                   "--depths layers (default 4,8,32), its time extrapolated to the full probe, "
                   "and the plan's estimate for header-only pairs (--estimates)")  # fmt: skip
    p.add_argument(
        "--probe",
        default=",".join(f"{k}={v}" for k, v in REDUCED_PROBE.items()),
        help="with --matched: the reduced probe's MatchedParams (default %(default)s)",
    )
    p.add_argument("--full-probe-layers", default="",
                   help="with --matched: also run the full default probe at these layer counts "
                   "(e.g. 4: a measured check of the extrapolation)")  # fmt: skip
    p.add_argument("--estimates", default="7b,70b",
                   help="with --matched: pairs whose estimate is computed from header-only "
                   "checkpoints (sparse files; %(default)s; empty: none)")  # fmt: skip
    p.add_argument("--rescore", type=Path,
                   help="with --matched: recompute a results file's extrapolated times at this "
                   "machine's speed now (rewritten in place; nothing is run)")  # fmt: skip
    p.add_argument("--rate-gflops", type=float, default=0.0,
                   help="with --rescore: this rate instead of measuring one")  # fmt: skip
    p.add_argument("--rate-from", default="", help="with --rate-gflops: where the rate comes from")
    args = p.parse_args()
    if args.matched:
        return main_matched(args)
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


def rescore(args: argparse.Namespace) -> None:
    """The extrapolations of a results file again: at the run's own rate (with this file's
    ``extrapolate``), and at this machine's rate now (the plan's: 0.7 of a 512 × 512 product's,
    at --threads; a run's own rate is measured once, when its first plan is made, and a busy
    moment then slows every estimate: two threads beside another busy process measure a fifth
    of one thread's rate) or ``--rate-gflops``, under ``rescored``. The file is rewritten and
    its summary printed. Nothing is run."""
    from crosslora.speed import EFFICIENCY, matmul_flops

    results = json.loads(args.rescore.read_text())
    if args.rate_gflops:
        rate, how = 1e9 * args.rate_gflops, {"rate_from": args.rate_from or "given"}
    else:
        rate = EFFICIENCY * matmul_flops(torch.device("cpu"))
        how = {"load_1min": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads()}
    for r in results["matched"].values():
        r["extrapolated_full_probe"] = {  # the run's rate, with this file's ``extrapolate``
            d: extrapolate(m, r["probe"], r["full_probe"], r["rate_flops"])
            for d, m in r["by_layers"].items()
        }
        r["rescored"] = {
            "rate_flops": rate, **how,
            "extrapolated_full_probe": {
                d: extrapolate(m, r["probe"], r["full_probe"], rate)
                for d, m in r["by_layers"].items()
            },
            # the plan's time for the full probe, at this rate
            "plan_seconds_full_probe": {
                d: round(m["estimate_full_probe"]["plan_seconds"] * r["rate_flops"] / rate, 1)
                for d, m in r["by_layers"].items()
            },
        }  # fmt: skip
    args.rescore.write_text(json.dumps(results, indent=2) + "\n")
    print(summary_matched(results))
    print(f"results: {args.rescore}")


def main_matched(args: argparse.Namespace) -> None:
    global THREADS, DEVICE
    THREADS, DEVICE = args.threads, args.device
    if THREADS:  # the plan's time estimate measures this process's speed: the children's threads
        torch.set_num_threads(THREADS)
    if args.rescore:
        return rescore(args)
    probe = {k: int(v) for k, v in (kv.split("=") for kv in args.probe.split(","))}
    depths = sorted({(int(d.split(":")[0]), int(d.split(":")[-1]))
                     for d in (args.depths or "4,8,32").split(",") if d})  # fmt: skip
    full_depths = sorted({int(d) for d in args.full_probe_layers.split(",") if d})
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch_threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
        "device": args.device, "load_1min_at_start": round(os.getloadavg()[0], 2),
        "matched": {}, "estimates": {},
    }  # fmt: skip
    try:
        sizes = [s for s in args.estimates.split(",") if s]
        results["estimates"] = header_estimates(args.work, sizes)
        for size in args.size or ["7b"]:
            results["matched"][size] = run_matched(size, args.work, depths, probe, full_depths,
                                                   args.layers_per_shard)  # fmt: skip
            results["load_1min_at_end"] = round(os.getloadavg()[0], 2)
            args.results.write_text(json.dumps(results, indent=2) + "\n")
            if not args.keep:  # a 7B pair is 27 GB: gone before the next size
                shutil.rmtree(args.work / f"matched-{size}", ignore_errors=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(summary_matched(results))
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
