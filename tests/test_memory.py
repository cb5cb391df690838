"""The memory a whole-model method needs is told in the plan and checked before anything loads."""

from __future__ import annotations

import pytest
import torch

import crosslora.memory as memory
from crosslora.anchor.probe import ProbeBatch, activation_bytes, collect, load_model
from crosslora.arch.layout import Layout
from crosslora.cli import main
from crosslora.io.checkpoint import Checkpoint


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "phi3"])
def test_the_estimate_is_what_the_probe_keeps_and_the_model_holds(tiny_model, name):
    """``activation_bytes`` counts exactly what ``collect`` keeps, ``parameter_bytes`` the
    loaded float32 model's parameters (tied ones once)."""
    path = tiny_model(name)
    layout = Layout(Checkpoint(path, "model"), "model")
    model = load_model(path, torch.device("cpu"), "model")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (7, 12, 9)]
    positions = [[0, 2, 5], list(range(1, 12)), [8]]
    acts = collect(model, layout, ProbeBatch(ids, positions), pad_id=0)
    kept = sum(t.nbytes for d in (acts.inputs, acts.residual) for t in d.values())
    assert kept == activation_bytes(layout, sum(map(len, positions))) > 0
    params = sum(p.numel() for p in model.parameters())
    assert memory.parameter_bytes(layout.checkpoint) == 4 * params


def transfer_argv(tiny_model, tiny_adapter, out, method="matched"):
    return ["transfer", "--adapter", str(tiny_adapter("llama")), "--source-model",
            str(tiny_model("llama")), "--target-model", str(tiny_model("gemma3_text")),
            "--out-path", str(out), "--method", method]  # fmt: skip


def test_the_plan_says_what_matched_needs(tiny_model, tiny_adapter, tmp_path, capsys):
    assert main([*transfer_argv(tiny_model, tiny_adapter, tmp_path / "o"), "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("memory: ")]
    assert len(lines) == 1 and "GB of RAM (both models in float32" in lines[0], lines
    assert main([*transfer_argv(tiny_model, tiny_adapter, tmp_path / "o", "crop-pad"),
                 "--dry-run"]) == 0  # fmt: skip
    assert "memory:" not in capsys.readouterr().out  # streaming methods need no estimate


def test_a_transfer_that_cannot_fit_is_refused_before_it_starts(
    tiny_model, tiny_adapter, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(memory, "available", lambda device: (10**6, None))  # 1 MB free
    loaded = []
    monkeypatch.setattr("crosslora.methods.matched.load_model", lambda *a: loaded.append(a))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(transfer_argv(tiny_model, tiny_adapter, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("crosslora: error: the matched method needs about "), err
    assert "and this machine has 0.0 GB available (RAM and swap)" in err[0], err
    assert not out.exists() and not loaded


def test_available_memory_is_read_from_the_system():
    host, dev = memory.available(torch.device("cpu"))
    assert dev is None
    assert host is None or host > 0
