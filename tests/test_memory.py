"""The memory a whole-model method needs is told in the plan and checked before anything loads."""

from __future__ import annotations

import shutil

import pytest
import torch

import crosslora.memory as memory
from crosslora.anchor.probe import ProbeBatch, Spilled, activation_bytes, collect, load_model
from crosslora.arch.layout import Layout
from crosslora.cli import main
from crosslora.io.checkpoint import Checkpoint
from crosslora.io.spool import Spool


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "phi3"])
def test_the_estimate_is_what_the_probe_keeps_and_the_model_holds(tiny_model, name):
    """``activation_bytes`` counts exactly what ``collect`` keeps per layer, spilled to a spool
    or not (the same rows either way); ``parameter_bytes`` the loaded float32 model's
    parameters (tied ones once)."""
    path = tiny_model(name)
    layout = Layout(Checkpoint(path, "model"), "model")
    model = load_model(path, torch.device("cpu"), "model")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (7, 12, 9, 5)]
    positions = [[0, 2, 5], list(range(1, 12)), [8], []]
    batch = ProbeBatch(ids, positions)
    acts = collect(model, layout, batch, pad_id=0, chunk=2)
    with Spool() as spool:
        spilled = collect(model, layout, batch, pad_id=0, chunk=2, spool=spool)
        for kept, back in ((acts.inputs, spilled.inputs), (acts.residual, spilled.residual)):
            assert isinstance(back, Spilled) and set(kept) == set(back)
            for key in kept:
                assert torch.equal(back[key], kept[key]), key
        assert spool.size == sum(activation_bytes(layout, 15))
    per_layer = [0] * layout.num_layers
    for key, t in [*acts.inputs.items(), *acts.residual.items()]:
        per_layer[key[0] if isinstance(key, tuple) else key] += t.nbytes
    assert per_layer == activation_bytes(layout, 15) and min(per_layer) > 0
    params = sum(p.numel() for p in model.parameters())
    assert memory.parameter_bytes(layout.checkpoint) == 4 * params


def transfer_argv(tiny_model, tiny_adapter, out, method="matched"):
    return ["transfer", "--adapter", str(tiny_adapter("llama")), "--source-model",
            str(tiny_model("llama")), "--target-model", str(tiny_model("gemma3_text")),
            "--out-path", str(out), "--method", method]  # fmt: skip


def test_the_plan_says_what_matched_needs(tiny_model, tiny_adapter, tmp_path, capsys):
    assert main([*transfer_argv(tiny_model, tiny_adapter, tmp_path / "o"), "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("memory: ")]
    assert len(lines) == 1 and "GB of disk beside the output (both models in float32" in lines[0], (
        lines
    )
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


def test_a_transfer_without_the_disk_for_its_activations_is_refused(
    tiny_model, tiny_adapter, tmp_path, capsys, monkeypatch
):
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda folder: free)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(transfer_argv(tiny_model, tiny_adapter, out)) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("crosslora: error: the matched method needs about 0.0 GB of disk "), err
    assert err.endswith(", and it has 0.0 GB free"), err
    assert not out.exists()


def test_available_memory_is_read_from_the_system():
    host, dev = memory.available(torch.device("cpu"))
    assert dev is None
    assert host is None or host > 0


def test_matched_holds_one_layers_fits_within_its_estimate(tiny_model, tiny_adapter, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Fits of layers already done are dropped; what is held never exceeds ``_fit_bytes``."""
    import crosslora.methods.matched as matched

    held: list[tuple[set, int]] = []
    fit = matched.Matched._fit

    def spy(self, key, make, ls, lt):
        value = fit(self, key, make, ls, lt)
        values = [v for _, _, v in self._fits.values()]
        tensors = [v.chol if isinstance(v, matched.Ridge) else v[0] for v in values]
        held.append(({(s, t) for s, t, _ in self._fits.values()}, sum(t.nbytes for t in tensors)))
        return value

    monkeypatch.setattr(matched.Matched, "_fit", spy)
    src, tgt = tiny_model("llama-deep"), tiny_model("gemma3_text")
    argv = ["transfer", "-q", "--adapter", str(tiny_adapter("llama-deep")), "--source-model",
            str(src), "--target-model", str(tgt), "--out-path", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0
    layouts = [Layout(Checkpoint(p, "model"), "model") for p in (src, tgt)]
    assert held and max(b for _, b in held) <= matched._fit_bytes(*layouts)
    assert all(len({t for _, t in scopes}) == 1 for scopes, _ in held)  # one target layer
    assert len({t for scopes, _ in held for _, t in scopes}) > 1  # and several in turn
