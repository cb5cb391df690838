"""The memory a whole-model method needs is told in the plan and checked before anything loads."""

from __future__ import annotations

import shutil

import pytest
import torch

import crosslora.memory as memory
from conftest import transfer_argv
from crosslora.arch.layout import Layout
from crosslora.cli import main
from crosslora.errors import CrossLoraError
from crosslora.io.checkpoint import Checkpoint
from crosslora.io.pretrained import load_model
from crosslora.io.spool import Spool
from crosslora.memory import MemoryNeed
from crosslora.methods import METHODS, get_method
from crosslora.methods.matched.probe import (
    ProbeBatch,
    Spilled,
    activation_bytes,
    collect,
)
from crosslora.methods.matched.sizes import RUNTIME_BYTES, fit_bytes
from crosslora.methods.matched.stream import Streamed


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
    run = Streamed(layout, torch.device("cpu"), "model")
    acts = collect(run, layout, batch, pad_id=0, chunk=2)
    with Spool() as spool:
        spilled = collect(run, layout, batch, pad_id=0, chunk=2, spool=spool)
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


@pytest.fixture
def pair(tiny_model, tiny_adapter) -> tuple:
    """(adapter, source, target): the llama adapter, onto gemma3_text."""
    return tiny_adapter("llama"), tiny_model("llama"), tiny_model("gemma3_text")


def layouts(*models) -> list[Layout]:
    return [Layout(Checkpoint(m, "model"), "model") for m in models]


# Methods that stream the base weights one tensor at a time: they need nothing beyond that, and
# say so with None. Every other method must give its estimate.
STREAMING = {"anchored", "copy", "crop-pad", "cross-lora", "lora-x"}
WHOLE_MODEL = {"matched"}


def test_every_method_is_known_to_stream_or_to_give_an_estimate():
    assert set(METHODS) == STREAMING | WHOLE_MODEL and not STREAMING & WHOLE_MODEL


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", sorted(STREAMING))
def test_a_streaming_method_needs_nothing_beyond_streaming(name, device, pair):
    """None is the method's answer "no extra memory", so the plan prints no ``memory:`` line and
    nothing is checked; only a streaming method may give it."""
    _, src, tgt = pair
    assert get_method(name).memory(*layouts(src, tgt), torch.device(device)) is None


def test_matched_estimates_its_largest_phase(pair):
    """Host, device and disk bytes of ``matched`` on the tiny pair (a ``cuda`` device is only
    named: nothing is allocated): the largest of its phases, each at least what it must hold
    (sampling: one model as stored; reading and calibration: a float32 layer; the fits: one
    layer's activations), never both whole models in float32 at once."""

    src, tgt = layouts(*pair[1:])
    method = get_method("matched")
    p = method.params
    a_s = activation_bytes(src, p.n_texts * p.text_tokens)
    a_t = activation_bytes(tgt, p.n_texts * p.text_tokens)
    runtime = RUNTIME_BYTES
    cpu = method.memory(src, tgt, torch.device("cpu"))
    assert isinstance(cpu, MemoryNeed)
    stored = max(memory.stored_bytes(src.checkpoint), memory.stored_bytes(tgt.checkpoint))
    assert cpu.host >= runtime + stored  # one model, as stored, samples the probe text
    assert cpu.host >= runtime + 3 * (max(a_s) + max(a_t)) + fit_bytes(src, tgt)
    assert cpu.device == 0  # on the CPU everything is in host
    assert cpu.disk == sum(a_s) + sum(a_t)  # every probe activation, parked beside the output
    phases = dict(x.split(" ", 1) for x in cpu.what.split(": ", 1)[1].split("; ")[0].split(", "))
    assert set(phases) == {"sampling", "reading", "fits", "calibration"}
    gpu = method.memory(src, tgt, torch.device("cuda"))
    assert isinstance(gpu, MemoryNeed)
    assert gpu.device == cpu.host - runtime  # the same phases, on the device
    assert gpu.host >= runtime + stored  # a model loads on the host before it moves
    assert gpu.disk == cpu.disk
    assert "(sampling whole)" in cpu.what  # it fits in what this machine has free
    # no GPU here: what one would have free is unknown, so the least it needs
    assert "(sampling one layer at a time)" in gpu.what
    assert f"the activations at {p.n_texts * p.text_tokens} probe positions" in cpu.what
    assert cpu.describe().startswith(f"about {memory.gb(cpu.host)} of RAM and ")
    assert f" on the device and {memory.gb(gpu.disk)} of disk" in gpu.describe()


def test_the_plan_says_what_matched_needs(pair, tmp_path, capsys):
    assert main([*transfer_argv(*pair, tmp_path / "o", "matched"), "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("memory: ")]
    assert len(lines) == 1 and "GB of disk beside the output (the largest phase, " in lines[0], (
        lines
    )
    assert main([*transfer_argv(*pair, tmp_path / "o", "crop-pad"), "--dry-run"]) == 0
    assert "memory:" not in capsys.readouterr().out  # streaming methods need no estimate


def test_a_transfer_that_cannot_fit_is_refused_before_it_starts(pair, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    monkeypatch.setattr(memory, "available", lambda device: (10**6, None))  # 1 MB free
    loaded = []
    monkeypatch.setattr("crosslora.methods.matched.sampling.load_model", lambda *a: loaded.append(a))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(transfer_argv(*pair, out, "matched")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("crosslora: error: the matched method needs about "), err
    assert "and this machine has 0.0 GB available (RAM and swap)" in err[0], err
    assert not out.exists() and not loaded


def test_a_transfer_without_the_disk_for_its_activations_is_refused(pair, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda folder: free)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(transfer_argv(*pair, out, "matched")) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("crosslora: error: the matched method needs about 0.0 GB of disk "), err
    assert err.endswith(", and it has 0.0 GB free"), err
    assert not out.exists()


def meminfo_kib(*fields: str) -> int:
    lines = memory.MEMINFO.read_text().splitlines()
    values = dict(line.split(":", 1) for line in lines if ":" in line)
    return sum(int(values[f].split()[0]) for f in fields)


def test_available_memory_is_read_from_the_system():
    """On Linux, the free RAM and swap now: a real number, at most all of RAM and swap."""
    if not memory.MEMINFO.is_file():
        pytest.skip(f"no {memory.MEMINFO} (not Linux)")
    host, dev = memory.available(torch.device("cpu"))
    assert dev is None  # no device memory on the CPU
    assert isinstance(host, int) and 0 < host <= 1024 * meminfo_kib("MemTotal", "SwapTotal")


def test_available_memory_is_memavailable_plus_free_swap(tmp_path, monkeypatch):
    """MemAvailable + SwapFree, in bytes; None (nothing checked) only where they cannot be read."""
    fake = tmp_path / "meminfo"
    monkeypatch.setattr(memory, "MEMINFO", fake)
    fake.write_text("MemTotal:  1000 kB\nMemFree:  10 kB\nMemAvailable:  300 kB\n"
                    "SwapTotal:  64 kB\nSwapFree:  20 kB\n")  # fmt: skip
    assert memory.available(torch.device("cpu")) == (320 * 1024, None)
    need = MemoryNeed(host=400 * 1024, device=0, what="test")
    with pytest.raises(CrossLoraError, match="needs about 0.0 GB of RAM .* has 0.0 GB available"):
        memory.check_fits(need, torch.device("cpu"), "test", tmp_path)
    memory.check_fits(MemoryNeed(320 * 1024, 0, "test"), torch.device("cpu"), "test", tmp_path)
    for unreadable in ("MemTotal:  1000 kB\nSwapFree:  20 kB\n", "MemAvailable: lots\n"):
        fake.write_text(unreadable)
        assert memory.available(torch.device("cpu")) == (None, None), unreadable
        memory.check_fits(need, torch.device("cpu"), "test", tmp_path)  # cannot tell: no refusal
    fake.unlink()
    assert memory.available(torch.device("cpu")) == (None, None)


def test_matched_holds_one_layers_fits_within_its_estimate(tiny_model, tiny_adapter, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Fits of layers already done are dropped; what is held, with the Gram matrix and factor of
    the ridge being made, never exceeds ``fit_bytes``."""
    import crosslora.methods.matched as matched

    held: list[tuple[set, int]] = []
    making: list[int] = []  # held, and the new ridge's Gram matrix and factor (float64)
    fit, ridge, now = matched._fit, matched.Ridge, {}

    def in_fits(pair) -> int:
        values = [v for _, _, v in pair.fits.values()]
        return sum((v.chol if isinstance(v, ridge) else v[0]).nbytes for v in values)

    def spy(pair, key, make, ls, lt):
        now["pair"] = pair
        value = fit(pair, key, make, ls, lt)
        held.append(({(s, t) for s, t, _ in pair.fits.values()}, in_fits(pair)))
        return value

    class Made(ridge):
        def __init__(self, x, alpha):
            making.append(in_fits(now["pair"]) + 16 * x.shape[1] ** 2)
            super().__init__(x, alpha)

    monkeypatch.setattr(matched, "_fit", spy)
    monkeypatch.setattr(matched, "Ridge", Made)
    src, tgt = tiny_model("llama-deep"), tiny_model("gemma3_text")
    argv = transfer_argv(tiny_adapter("llama-deep"), src, tgt, tmp_path / "o", None, "-q",
                         "--no-cache")  # every fit made here  # fmt: skip
    assert main(argv) == 0  # the default method: matched
    limit = fit_bytes(*layouts(src, tgt))
    assert held and max(b for _, b in held) <= limit
    assert making and max(making) <= limit
    assert all(len({t for _, t in scopes}) == 1 for scopes, _ in held)  # one target layer
    assert len({t for scopes, _ in held for _, t in scopes}) > 1  # and several in turn


def test_matched_makes_each_fit_once(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    """Without the pair cache (and on a GPU, which keeps no fits) every fit a layer's modules
    share is made once: the MLP-neuron ridge serves gate and up, the residual-stream map o and
    down, and neither is dropped between its users. The plan's time counts the same fits."""
    import crosslora.methods.matched as matched
    from crosslora.pipeline import TransferOptions, plan_transfers

    made: list[tuple] = []
    stored = matched._stored

    def spy(pair, what, make):
        made.append(what)
        return stored(pair, what, make)

    monkeypatch.setattr(matched, "_stored", spy)
    for source, target in (("llama-deep", "gemma3_text"), ("llama", "mistral")):
        made.clear()
        src, tgt, adapter = tiny_model(source), tiny_model(target), tiny_adapter(source)
        argv = transfer_argv(adapter, src, tgt, tmp_path / target, None, "-q", "--no-cache")
        assert main(argv) == 0
        shared = [w for w in made if w[0] in ("in", "mid", "res")]
        assert any(w[0] == "mid" for w in shared) and any(w[0] == "res" for w in shared)
        assert len(shared) == len(set(shared)), sorted(w for w in shared if shared.count(w) > 1)
        options = TransferOptions(method="matched", cache=False)
        (inputs,), (plan,) = plan_transfers([str(adapter)], str(src), str(tgt), options)
        assert len(matched.distinct_fits(inputs.src, inputs.tgt, plan.tasks)) == len(made)
