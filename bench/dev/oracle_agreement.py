"""How far the target's own adapter (the oracle) agrees, on `matched`'s probe text, with the source
adapter's effect there: the ceiling of what the calibration's objective can see (not a test).

Samples the probe text exactly as `matched` does, keeps the calibration's texts and chunks, and
prints each adapter's change of every chunk's log-likelihood (each adapter merged into its own
base model with PEFT): the source adapter on the source model, the oracle and each transferred
adapter on the target, with `corr`/`explained` as in `method_diagnostics.probe_effect`:

    .venv/bin/python bench/dev/oracle_agreement.py smollm2-135m gemma3-270m \\
        adapters/smollm2-135m-commonsense adapters/gemma3-270m-commonsense TRANSFERRED...

Model names are those of `crosslora models pull`. Two models in float32 on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel

import crosslora.methods.matched as mm
from crosslora.anchor import calibrate as cal
from crosslora.anchor.probe import ProbeBatch, align, load_model, special_id
from crosslora.anchor.vocab import load_tokenizer
from crosslora.zoo.models import model_path


def effect(path: Path, adapter: str, batch: ProbeBatch, pad: int, base: torch.Tensor):
    model = PeftModel.from_pretrained(load_model(path, torch.device("cpu"), "model"), adapter)
    return cal.chunk_loglik(model.merge_and_unload(), batch, pad) - base


def rms(d: torch.Tensor) -> float:
    return round(float(d.pow(2).mean().sqrt()), 3)


def main(src: str, tgt: str, adapter_s: str, oracle: str, *transferred: str) -> None:
    torch.set_grad_enabled(False)
    path_s, path_t = model_path(src, must_exist=True), model_path(tgt, must_exist=True)
    tok_s, tok_t = load_tokenizer(path_s, "source"), load_tokenizer(path_t, "target")
    cpu = torch.device("cpu")
    model_s, model_t = load_model(path_s, cpu, "source"), load_model(path_t, cpu, "target")
    texts = mm.probe_texts(model_s, tok_s, model_t, tok_t, mm.N_TEXTS, mm.SEED)
    keep = slice(None, None, mm.N_TEXTS // mm.CALIBRATION_TEXTS)
    aligned = align(texts, tok_s, tok_t)
    batch_s, batch_t = (ProbeBatch(b.ids[keep], b.positions[keep]) for b in aligned)
    pad_s = special_id(tok_s, "pad", "eos", "bos") or 0
    pad_t = special_id(tok_t, "pad", "eos", "bos") or 0
    base_s = cal.chunk_loglik(model_s, batch_s, pad_s)
    base_t = cal.chunk_loglik(model_t, batch_t, pad_t)
    del model_s, model_t
    d_s = effect(path_s, adapter_s, batch_s, pad_s, base_s)
    print(f"source adapter: {len(d_s)} chunks, rms {rms(d_s)}")
    d_o = effect(path_t, oracle, batch_t, pad_t, base_t)
    print(f"oracle: rms {rms(d_o)}, vs source {cal.agreement(d_s, d_o)}")
    for adapter in transferred:
        d_t = effect(path_t, adapter, batch_t, pad_t, base_t)
        print(f"{adapter}: rms {rms(d_t)}, vs source {cal.agreement(d_s, d_t)}, "
              f"vs oracle {cal.agreement(d_o, d_t)}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
