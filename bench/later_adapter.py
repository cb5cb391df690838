"""What a later adapter for the same pair costs against the first: ``crosslora transfer`` (the
default method) run twice through one fresh cache folder, the first preparing the pair (probe
text, activations, fits) and keeping it, the second reading it; wall time, peak RSS and the time
of each progress bar per run, and whether the second wrote the first's tensors exactly.

Usage::

    python bench/later_adapter.py --source-model M_S --target-model M_T --adapter A \\
        [--threads 2] [--work DIR] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BAR = re.compile(r"\r?([\w ()]+?): +100%\|[^|]*\| *\d+/\d+ \[(\d+:)?(\d+):(\d+)<")


def bar_seconds(stderr: str) -> dict[str, int]:
    """Each finished progress bar's elapsed seconds, by its description (the last one seen)."""
    out = {}
    for m in BAR.finditer(stderr):
        h, mm, ss = m.group(2), m.group(3), m.group(4)
        out[m.group(1).strip()] = int(h[:-1] if h else 0) * 3600 + int(mm) * 60 + int(ss)
    return out


def run(args, out: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "crosslora", "transfer", "--adapter", args.adapter,
           "--source-model", args.source_model, "--target-model", args.target_model,
           "--out-path", str(out), "--cache-dir", str(cache),
           "--threads", str(args.threads)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    report = json.loads((out / "transfer_report.json").read_text())
    return {"seconds": round(seconds, 1), "bars": bar_seconds(done.stderr),
            "pair_cache": report["pair_cache"],
            "pair_fits": report["method_diagnostics"].get("pair_fits"),
            "command": " ".join(cmd)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--source-model", "--target-model", "--adapter"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/crosslora-later-adapter")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    first = run(args, work / "first", work / "cache")
    peak_first = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    second = run(args, work / "second", work / "cache")
    a = load_file(work / "first" / "adapter_model.safetensors")
    b = load_file(work / "second" / "adapter_model.safetensors")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept = sum(f.stat().st_size for f in (work / "cache" / "pairs").rglob("*") if f.is_file())
    result = {
        "first": first, "second": second, "ratio": round(second["seconds"] / first["seconds"], 3),
        "tensor_for_tensor": same, "tensors": len(a), "pair_cache_bytes": kept,
        "peak_rss_mb_first": peak_first, "threads": args.threads, "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
