"""Does `--device cuda` compute what `--device cpu` computes? Every method, four family pairs.

Not a test (CI has no GPU). Builds the test suite's tiny random models (tests/conftest.py: llama,
mistral, qwen2, gemma3_text, each with its word-level tokenizer) and a random rank-4 adapter on each
source, transfers it with every method on each ``--devices`` entry, and compares the written
adapters: per module ``ΔW = scale · B A`` in float64, ``‖ΔW_dev − ΔW_ref‖ / ‖ΔW_ref‖`` against the
first device's. Prints a markdown table (worst module per method and pair, seconds per transfer)
and writes ``--results`` (JSON). Exits 1 if any module differs by more than ``--tol``.

    .venv/bin/python bench/device_check.py --devices cpu,cuda      # on a machine with a GPU
    .venv/bin/python bench/device_check.py --devices cpu,cpu       # the check itself: all 0

Methods that sample or sketch with a generator on the compute device (the fast SVD's sketch)
differ between devices by their own accuracy, not by a bug; ``matched`` samples its probe text
with a CPU generator, so it sees the same text on every device unless a sampling probability
lands within round-off of a cut.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_model, build_tokenizer, make_adapter  # noqa: E402
from crosslora.cli import main  # noqa: E402
from crosslora.io.peft_adapter import read_adapter  # noqa: E402
from crosslora.methods import METHODS  # noqa: E402

# the first pair has equal shapes, so that `copy` runs too
PAIRS = [
    ("llama", "mistral"),
    ("llama", "qwen2"),
    ("qwen2", "gemma3_text"),
    ("gemma3_text", "llama"),
]


def delta_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """Module -> ΔW (out, in), float64, from a written PEFT adapter's factors."""
    read = read_adapter(adapter)
    return {m: read.factors(m).to("cpu", torch.float64).delta() for m in read.modules}


def transfer(
    src: Path, tgt: Path, adapter: Path, method: str, device: str, out: Path
) -> float | None:
    """Seconds the transfer took; None where crosslora refused it (``copy`` across shapes)."""
    argv = ["transfer", "-q", "--adapter", str(adapter), "--source-model", str(src),
            "--target-model", str(tgt), "--out-path", str(out), "--method", method,
            "--device", device, "--no-cache"]  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    return time.perf_counter() - start if code == 0 else None


def build(root: Path, name: str) -> Path:
    path = root / name
    if not path.exists():
        build_model(name).save_pretrained(path)
        build_tokenizer(name).save_pretrained(path)
    return path


def main_() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; the first is reference")
    p.add_argument("--methods", default=",".join(sorted(METHODS)))
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--results", type=Path, default=Path("/tmp/crosslora-device-check.json"))
    args = p.parse_args()
    methods = args.methods.split(",")
    names = args.devices.split(",")  # labels unique even if a device repeats (cpu,cpu)
    devices = [d if names.index(d) == i else f"{d}#{i}" for i, d in enumerate(names)]
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for s, t in PAIRS:
            src, tgt = build(root, s), build(root, t)
            adapter = make_adapter(src, root / f"adapter-{s}", b_std=0.05)
            for method in methods:
                outs = {d: root / f"{s}-{t}-{method}-{i}" for i, d in enumerate(devices)}
                seconds = {
                    d: transfer(src, tgt, adapter, method, d.split("#")[0], o)
                    for d, o in outs.items()
                }
                if all(v is None for v in seconds.values()):
                    continue  # refused on every device (copy across shapes)
                if any(v is None for v in seconds.values()):
                    raise SystemExit(f"{s} -> {t} {method}: refused on some devices: {seconds}")
                ref = delta_weights(outs[devices[0]])
                err = {}
                for d in devices[1:]:
                    got = delta_weights(outs[d])
                    assert got.keys() == ref.keys(), (method, d)
                    err[d] = max(
                        float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
                        for k in ref
                    )
                    worst = max(worst, err[d])
                rows.append({"pair": f"{s} -> {t}", "method": method, "modules": len(ref),
                             "max_rel_diff": err, "seconds": seconds})  # fmt: skip
                print(f"{s} -> {t} {method}: {err} {seconds}", flush=True)
    head = " | ".join(f"max rel ΔW diff, {d}" for d in devices[1:])
    secs = " | ".join(f"s, {d}" for d in devices)
    print(f"\n| pair | method | modules | {head} | {secs} |")
    print("|---" * (3 + len(devices) - 1 + len(devices)) + "|")
    for r in rows:
        diffs = " | ".join(f"{r['max_rel_diff'][d]:.1e}" for d in devices[1:])
        times = " | ".join(f"{r['seconds'][d]:.2f}" for d in devices)
        print(f"| {r['pair']} | {r['method']} | {r['modules']} | {diffs} | {times} |")
    info = {"devices": devices, "torch": torch.__version__, "tol": args.tol, "worst": worst,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "rows": rows}  # fmt: skip
    args.results.write_text(json.dumps(info, indent=1))
    print(f"\nworst module difference {worst:.2e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    raise SystemExit(main_())
