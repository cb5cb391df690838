"""Adapters per second for a batch spread over a Ray cluster (``crosslora transfer --ray``),
against the single-process batch, all in one run; every output checked against the
single-process one, tensor for tensor.

Not a test. Builds (once, kept under --work) a pair of random llama-shaped models from configs
(hidden 256 -> 384, 4 layers each) sharing a word-level tokenizer, and --adapters random LoRA
adapters on the source's attention (rank 8), then times ``crosslora transfer`` with the default
method, one thread per task, a fresh cache each run (so every run prepares the pair once):

- single: one process, the whole batch;
- ray local: ``--ray local`` (a cluster of this machine's cores, started for the run);
- ray N workers: through a cluster started with ``ray start --head --num-cpus=N``, N = 1, 2.

    .venv/bin/python bench/ray_throughput.py [--adapters 8] [--work /tmp/crosslora-ray-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2)  # fmt: skip
TARGET = dict(hidden_size=384, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=3)  # fmt: skip
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]  # an attention adapter, rank 8


def build(work: Path, adapters: int) -> tuple[Path, Path, Path]:
    """The two models and a folder of ``adapters`` adapters (made once)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import transformers as tf

    from conftest import COMMON, build_tokenizer, make_adapter

    src, tgt, folder = work / "source", work / "target", work / "adapters"
    for path, shape, seed in ((src, SOURCE, 1), (tgt, TARGET, 2)):
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**COMMON, **shape))
            model.save_pretrained(path)
            build_tokenizer("llama").save_pretrained(path)
    for i in range(adapters):
        if not (folder / f"a{i}" / "adapter_config.json").exists():
            make_adapter(src, folder / f"a{i}", MODULES, r=8, seed=i + 1)
    return src, tgt, folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / "crosslora"), *argv], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def same(a: Path, b: Path) -> bool:
    for sub in sorted(p.name for p in a.iterdir()):
        ta = load_file(a / sub / "adapter_model.safetensors")
        tb = load_file(b / sub / "adapter_model.safetensors")
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/crosslora-ray-bench"))
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "ray_throughput_results.json")
    args = p.parse_args()
    src, tgt, folder = build(args.work, args.adapters)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["RAY_AUTH_MODE"] = "token"  # the cluster below asks for Ray's token, and so does the driver
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env,
                   capture_output=True)  # fmt: skip
    runs: dict[str, dict] = {}

    def run(name: str, *extra: str) -> None:
        slug = name.replace(" ", "-")
        out, cache = args.work / "out" / slug, args.work / "cache" / slug
        for path in (out, cache):
            shutil.rmtree(path, ignore_errors=True)
        argv = ["transfer", "-q", "--adapter", str(folder), "--source-model", str(src),
                "--target-model", str(tgt), "--out-path", str(out), "--cache-dir", str(cache),
                "--threads", "1", *extra]  # fmt: skip
        seconds = timed(argv, env)
        runs[name] = {"seconds": round(seconds, 2),
                      "adapters_per_s": round(args.adapters / seconds, 4),
                      "load_average_1min_after": os.getloadavg()[0]}  # fmt: skip
        if name != "single":
            runs[name]["identical_to_single"] = same(args.work / "out" / "single", out)
            # the fits each task made itself: none, when the preparation made them ahead
            runs[name]["fits_made_by_each_task"] = [
                json.loads((sub / "transfer_report.json").read_text())["method_diagnostics"]
                ["pair_fits"]["made"] for sub in sorted(out.iterdir())]  # fmt: skip
        same_as = runs[name].get("identical_to_single")
        print(f"{name:15} {seconds:7.1f} s  {args.adapters / seconds:.3f} adapters/s"
              + ("" if same_as is None else f"  identical to single: {same_as}"), flush=True)

    run("single")
    run("ray local", "--ray", "local")
    for workers in (1, 2):
        port = free_port()
        head = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={workers}",
                "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
        subprocess.run(head, check=True, env=env, capture_output=True)
        try:
            run(f"ray {workers} worker" + "s" * (workers > 1), "--ray", f"127.0.0.1:{port}")
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
    ratio = runs["ray 2 workers"]["adapters_per_s"] / runs["ray 1 worker"]["adapters_per_s"]
    print(f"2 workers / 1 worker: {ratio:.2f}x adapters/s")
    import ray

    result = {"adapters": args.adapters, "method": "matched", "threads_per_task": 1,
              "source": SOURCE, "target": TARGET, "cores": len(os.sched_getaffinity(0)),
              "ray": ray.__version__, "runs": runs,
              "ratio_2_workers_to_1": round(ratio, 3)}  # fmt: skip
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    if not all(r.get("identical_to_single", True) for r in runs.values()):
        sys.exit("an output differs from the single-process run")


if __name__ == "__main__":
    main()
