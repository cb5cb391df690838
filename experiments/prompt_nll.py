"""Which base model reads the task's text better: each model's NLL per character of the 32
unlabeled prompts the refine benchmark seeds its teacher with (``bench/refine_table.py``,
``training_prompts(32, 0)``: ARC-Easy, ARC-Challenge and OpenBookQA *train* inputs, no answers),
with the paired differences between models. Neither model wrote these texts, so no model reads
its own sampling ("Refine", docs/results.md: the objective against this signal).

Usage::

    python experiments/prompt_nll.py smollm2-135m gemma3-270m qwen2.5-0.5b [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench")]
from refine_table import training_prompts  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from crosslora.refine.prompts import nll_per_char  # noqa: E402
from crosslora.zoo.models import model_path  # noqa: E402


def read(folder: Path, texts: list[str]) -> torch.Tensor:
    """Each text's NLL in nats per character under the model in ``folder`` (float32, CPU), as
    ``--refine-objective auto`` reads the prompts (``crosslora.refine.prompts.nll_per_char``)."""
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 trust_remote_code=False).eval()  # fmt: skip
    return nll_per_char(model, tok, texts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="names as in `crosslora models pull`, or folders")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = training_prompts(32, 0)
    nll = {}
    for name in args.models:
        folder = Path(name) if Path(name).is_dir() else model_path(name, must_exist=True)
        nll[name] = read(folder, texts)
        print(f"{name}: {nll[name].mean():.4f} nats per character", flush=True)
    for a, b in itertools.combinations(args.models, 2):
        d = nll[a] - nll[b]
        half = 1.96 * float(d.std()) / len(d) ** 0.5
        print(f"{a} minus {b}: {float(d.mean()):+.4f} ± {half:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
