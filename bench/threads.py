"""A cold transfer alone and beside one other busy job, with crosslora's thread settings and
without them (OpenMP's default wait policy), all in one run: thread oversubscription, measured.

Not a test. Makes a synthetic one-layer pair at 1B shapes with ``bench/perf.py``'s writers
(once, kept under --work), then times ``crosslora transfer --method cross-lora --no-cache`` on
it in six settings:

- quiet / busy: alone, or while another process runs float32 matrix products on every core
  (torch's default threads: what a second transfer or a test suite does);
- ours / ours, 1 thread / OpenMP default: the command as shipped (``OMP_WAIT_POLICY=PASSIVE``
  and ``--threads`` from the process's CPU affinity), the same with ``OMP_NUM_THREADS=1``, or
  with ``OMP_WAIT_POLICY`` set empty, which OpenMP reads as unset (its default: threads spin
  while they wait for work).

    .venv/bin/python bench/threads.py [--size 1b] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a = (a @ a).tanh()\n"


def synthetic(size: str, work: Path) -> tuple[Path, Path, Path]:
    """``bench/perf.py``'s one-layer source, target and adapter at ``size`` (made once, kept)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import perf

    src_c, tgt_c = perf.SIZES[size]
    root = work / size
    src, tgt, adapter = root / "source", root / "target", root / "adapter"
    if not adapter.exists():
        perf.write_model(src, src_c, 1, seed=1, layers_per_shard=1)
        perf.write_model(tgt, tgt_c, 1, seed=2, layers_per_shard=1)
        perf.write_adapter(adapter, src_c, 1, seed=3)
    return src, tgt, adapter


def transfer_seconds(src: Path, tgt: Path, adapter: Path, out: Path, env: dict) -> float:
    cmd = [str(Path(sys.executable).with_name("crosslora")), "transfer", "-q", "--adapter",
           str(adapter), "--source-model", str(src), "--target-model", str(tgt), "--out-path",
           str(out), "--method", "cross-lora", "--no-cache", "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/crosslora-threads"))
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "threads_results.json")
    args = p.parse_args()
    src, tgt, adapter = synthetic(args.size, args.work)
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    settings = {
        "ours": {**base_env},
        "ours, 1 thread": {**base_env, "OMP_NUM_THREADS": "1"},
        "OpenMP default": {**base_env, "OMP_WAIT_POLICY": ""},
    }
    rows = []
    for load in ("quiet", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
        try:
            if busy:
                time.sleep(3)  # let it start computing
            for name, env in settings.items():
                for _ in range(args.repeats):
                    s = transfer_seconds(src, tgt, adapter, args.work / "out", env)
                    rows.append({"load": load, "setting": name, "seconds": round(s, 2)})
                    print(f"{load:5} {name:15} {s:7.1f} s", flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    args.results.write_text(json.dumps({"size": args.size, "cores": len(os.sched_getaffinity(0)),
                                        "runs": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
