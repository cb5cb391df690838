"""The basis cache (hits, invalidation, corruption, two runs sharing it at once), batch transfer,
and reads that sweep the checkpoint shard by shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_folder, transfer_argv
from crosslora.cli import main
from crosslora.methods import METHODS
from crosslora.pipeline import TransferOptions, transfer, transfer_batch

BASES_PER_RUN = 2 * 14  # llama -> qwen2 by index: 2 layer pairs x 7 roles, source and target bases


def run(adapter, src, tgt, out, cache_dir: Path | None, **kw) -> dict:
    options = TransferOptions(method="cross-lora", cache=cache_dir is not None, cache_dir=str(cache_dir or ""),
                              cache_min_elements=0, **kw)  # fmt: skip
    return transfer(str(adapter), str(src), str(tgt), out, options, progress=False)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture
def pair(tiny_model, tiny_adapter, tmp_path):
    """A private copy of the source model (tests rewrite it), the target, the adapter."""
    src = copy_folder(tiny_model("llama"), tmp_path / "src-model")
    return tiny_adapter("llama"), src, tiny_model("qwen2")


@pytest.mark.parametrize("svd", ["fast", "exact"])
def test_second_transfer_hits_the_cache_and_is_bit_identical(pair, tmp_path, svd):
    adapter, src, tgt = pair
    cache = tmp_path / "cache"
    first = run(adapter, src, tgt, tmp_path / "a", cache, svd=svd)
    assert first["basis_cache"] | {"dir": None} == {"dir": None, "hits": 0,
                                                     "misses": BASES_PER_RUN,
                                                     "corrupt_recomputed": 0}  # fmt: skip
    assert len(list(cache.rglob("*.safetensors"))) == BASES_PER_RUN
    second = run(adapter, src, tgt, tmp_path / "b", cache, svd=svd)
    assert (second["basis_cache"]["hits"], second["basis_cache"]["misses"]) == (BASES_PER_RUN, 0)
    run(adapter, src, tgt, tmp_path / "none", None, svd=svd)
    assert_identical(tmp_path / "a", tmp_path / "none")
    assert_identical(tmp_path / "b", tmp_path / "none")
    # the other SVD mode has its own entries
    other = run(adapter, src, tgt, tmp_path / "c", cache, svd="exact" if svd == "fast" else "fast")
    assert other["basis_cache"]["hits"] == 0


def test_a_changed_model_file_invalidates_its_entries(pair, tmp_path):
    adapter, src, tgt = pair
    cache = tmp_path / "cache"
    run(adapter, src, tgt, tmp_path / "a", cache)
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"] *= 2
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    again = run(adapter, src, tgt, tmp_path / "b", cache)
    # every source basis is recomputed (the file changed), every target basis is a hit
    assert again["basis_cache"]["misses"] == BASES_PER_RUN // 2
    assert again["basis_cache"]["hits"] == BASES_PER_RUN // 2
    run(adapter, src, tgt, tmp_path / "none", None)
    assert_identical(tmp_path / "b", tmp_path / "none")


def test_a_corrupt_entry_is_detected_and_recomputed(pair, tmp_path, caplog):
    adapter, src, tgt = pair
    cache = tmp_path / "cache"
    run(adapter, src, tgt, tmp_path / "a", cache)
    entries = sorted(cache.rglob("*.safetensors"))
    blob = bytearray(entries[0].read_bytes())
    blob[-3] ^= 0xFF  # one bit pattern in the tensor data: header still valid, checksum not
    entries[0].write_bytes(bytes(blob))
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # truncated
    entries[2].write_bytes(b"")
    with caplog.at_level("WARNING", logger="crosslora"):
        report = run(adapter, src, tgt, tmp_path / "b", cache)
    stats = report["basis_cache"]
    assert (stats["corrupt_recomputed"], stats["misses"]) == (3, 3)
    assert stats["hits"] == BASES_PER_RUN - 3
    assert sum("is corrupt" in r.message for r in caplog.records) == 3
    assert_identical(tmp_path / "b", tmp_path / "a")
    healed = run(adapter, src, tgt, tmp_path / "c", cache)  # the entries were rewritten
    assert healed["basis_cache"]["hits"] == BASES_PER_RUN


def test_two_transfers_sharing_one_cache_run_concurrently(pair, tmp_path):
    adapter, src, tgt = pair
    cache = tmp_path / "cache"
    code = (
        "import sys; from crosslora.pipeline import TransferOptions, transfer; "
        "transfer(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "
        "TransferOptions(method='cross-lora', cache_dir=sys.argv[5], cache_min_elements=0), "
        "progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    argv = [sys.executable, "-c", code, str(adapter), str(src), str(tgt)]
    procs = [
        subprocess.Popen([*argv, str(tmp_path / name), str(cache)], env=env)
        for name in ("one", "two")
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    run(adapter, src, tgt, tmp_path / "none", None)
    assert_identical(tmp_path / "one", tmp_path / "none")
    assert_identical(tmp_path / "two", tmp_path / "none")
    assert not list(cache.rglob("*.tmp"))  # no temporary files left behind
    after = run(adapter, src, tgt, tmp_path / "three", cache)  # every entry whole and valid
    assert after["basis_cache"]["hits"] == BASES_PER_RUN


def test_small_weights_are_not_cached_by_default(pair, tmp_path):
    adapter, src, tgt = pair
    options = TransferOptions(method="cross-lora", cache_dir=str(tmp_path / "cache"))
    report = transfer(str(adapter), str(src), str(tgt), tmp_path / "a", options, progress=False)
    assert report["basis_cache"]["misses"] == 0 and not (tmp_path / "cache").exists()


# --- batch ----------------------------------------------------------------------------------


def test_batch_transfer_reuses_everything_and_matches_single_runs(
    tiny_model, tiny_adapter, tmp_path, monkeypatch
):
    src, tgt = tiny_model("llama"), tiny_model("llama-twin")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
        copy_folder(tiny_adapter("llama", seed=seed), adapters / name)
    prepared = []
    anchored = METHODS["anchored"]
    original = anchored.prepare
    monkeypatch.setattr(anchored, "prepare",
                        lambda self, *a, **k: prepared.append(1) or original(self, *a, **k))  # fmt: skip
    out = tmp_path / "out"
    argv = transfer_argv([adapters / "alpha", adapters / "beta"], src, tgt, out, "anchored", "-q",
                         "--no-cache")  # fmt: skip
    assert main(argv) == 0
    assert prepared == [1]  # the method's preparation ran once for both
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        single = tmp_path / f"single-{name}"
        assert main(transfer_argv(adapters / name, src, tgt, single, "anchored", "-q",
                                  "--no-cache")) == 0  # fmt: skip
        assert_identical(out / name, single)
        report = json.loads((out / name / "transfer_report.json").read_text())
        assert report["source_adapter"] == str(adapters / name)
    # a folder of adapters: every subfolder that is one
    (adapters / "notes").mkdir()
    reports = transfer_batch([str(adapters / n) for n in ("alpha", "gamma")], str(src), str(tgt),
                             tmp_path / "api", TransferOptions(cache=False), progress=False)  # fmt: skip
    assert len(reports) == 2
    # a folder of adapters, with the default method (None: no --method), as transfer_batch
    argv = transfer_argv(adapters, src, tgt, tmp_path / "all", None, "-q", "--no-cache")
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["alpha", "beta", "gamma"]
    assert_identical(tmp_path / "all" / "gamma", tmp_path / "api" / "gamma")


def test_batch_refuses_two_adapters_with_one_folder_name(
    tiny_model, tiny_adapter, tmp_path, capsys
):
    a = copy_folder(tiny_adapter("llama"), tmp_path / "x" / "same")
    b = copy_folder(tiny_adapter("llama"), tmp_path / "y" / "same")
    argv = transfer_argv([a, b], tiny_model("llama"), tiny_model("qwen2"), tmp_path / "out", None)
    assert main(argv) == 2
    assert "would both be written to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- streaming ------------------------------------------------------------------------------


def test_base_weights_are_read_shard_by_shard_and_not_kept(tiny_model, tiny_adapter, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Source reads go through the shards in file order; each weight is read once per role pair
    (bases are not recomputed) and no task keeps a reference to a weight after it is done."""
    import weakref

    from crosslora.io.checkpoint import Checkpoint

    src = copy_folder(tiny_model("llama-deep"), tmp_path / "sharded")
    weights = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(weights, key=lambda k: (k.split(".")[2] if ".layers." in k else "z", k))
    shards = {n: f"model-0000{1 + (i * 3) // len(names)}-of-00003.safetensors"
              for i, n in enumerate(reversed(names))}  # later layers in earlier shards  # fmt: skip
    for shard in set(shards.values()):
        save_file({n: weights[n] for n in names if shards[n] == shard}, src / shard,
                  metadata={"format": "pt"})  # fmt: skip
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    # the target: a copy (the model itself is refused but for --method copy)
    same = copy_folder(src, tmp_path / "same")
    reads, alive = [], []
    original = Checkpoint.get

    def get(self, name):
        t = original(self, name)
        if self.path in (src, same) and "proj" in name:
            reads.append(shards[name])
            alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(Checkpoint, "get", get)
    adapter = tiny_adapter("llama-deep")
    transfer(str(adapter), str(src), str(same), tmp_path / "out",
             TransferOptions(method="cross-lora", cache=False), progress=False)  # fmt: skip
    assert reads == sorted(reads)  # shard order, each shard once
    assert len(reads) == 2 * 4 * 7  # once per role and model (4 layers x 7 roles, both sides)
    assert all(ref() is None for ref in alive)
