"""Memory that does not grow with depth: finished factors parked on disk (``Spool``), the weights
file written one tensor at a time (``write_safetensors``), glibc's heap kept from fragmenting."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from crosslora.errors import CrossLoraError
from crosslora.execute import assemble, execute_batch
from crosslora.io.safetensors_file import TensorFile, write_safetensors
from crosslora.io.spool import ParkedFactors, Spool
from crosslora.lora import LoraFactors
from crosslora.methods import get_method
from crosslora.plan import plan_transfer, resolve


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.lora_A.weight": torch.randn(4, 7, generator=g),
        "a.lora_B.weight": torch.randn(9, 4, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar_row": torch.randn(1, generator=g),
    }


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "w.safetensors"
    write_safetensors(path, iter(tensors.items()), {"format": "pt", "note": "x"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # aligned data block
    ours = TensorFile(path)
    assert all(torch.equal(ours.get(n), t) for n, t in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no data file left


def test_a_failure_while_streaming_leaves_no_file(tmp_path):
    def tensors():
        yield "a", torch.ones(3)
        raise CrossLoraError("lora_B does not fit in float16")

    with pytest.raises(CrossLoraError):
        write_safetensors(tmp_path / "w.safetensors", tensors())
    with pytest.raises(ValueError, match="written twice"):
        write_safetensors(tmp_path / "w.safetensors", [("a", torch.ones(2)), ("a", torch.ones(2))])
    assert list(tmp_path.iterdir()) == []


def test_spool_returns_what_was_parked_and_leaves_no_file(tmp_path):
    tensors = _tensors()
    with Spool(tmp_path) as spool:
        parked = {n: spool.put(t) for n, t in tensors.items()}
        f = LoraFactors(torch.randn(2, 6), torch.randn(5, 2), 0.75)
        pf = spool.park(f)
        assert list(tmp_path.iterdir()) == []  # anonymous: nothing to clean up after a kill
        for name, t in reversed(tensors.items()):  # any order
            got = spool.get(parked[name])
            assert got.dtype == t.dtype and torch.equal(got, t)
        back = spool.load(pf)
        assert torch.equal(back.A, f.A) and torch.equal(back.B, f.B) and back.scale == 0.75
        assert spool.size == sum(p.nbytes for p in parked.values()) + pf.A.nbytes + pf.B.nbytes


@pytest.mark.parametrize("method", ["cross-lora", "copy"])
def test_parked_results_equal_held_results(method, tiny_model, tiny_adapter, tmp_path):
    """With a spool, results hold file offsets, not tensors; read back they are the same."""
    name = "llama"
    (inputs,) = resolve([str(tiny_adapter(name))], str(tiny_model(name)),
                        str(tiny_model("llama-twin")))  # fmt: skip
    meth = get_method(method)
    plan = plan_transfer(inputs, meth, None, 8)
    held = execute_batch(meth, [inputs], [plan], torch.device("cpu"), progress=False)[0]
    with Spool(tmp_path) as spool:
        parked = execute_batch(meth, [inputs], [plan], torch.device("cpu"), False, None, spool)[0]
        assert parked and all(isinstance(r.stored, ParkedFactors) for r in parked)
        for a, b in zip(held, parked):
            assert torch.equal(a.factors.A, b.factors.A) and torch.equal(a.factors.B, b.factors.B)
        modules = list(assemble(parked))
        assert [m for m, _ in modules] == sorted(m for m, _ in assemble(held))


def test_large_frees_go_back_to_the_system(monkeypatch):
    """glibc's mmap threshold is fixed (the measured flat-memory fix), unless the user set it."""
    import platform

    from crosslora.heap import return_large_frees

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_large_frees() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert return_large_frees() is True
