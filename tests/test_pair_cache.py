"""The pair cache (``crosslora.pair_cache``): ``matched``'s preparation of a pair (the probe and
its activations, then the fits made from them), made once and read by every later transfer
between the same models; a hit writes the adapter a fresh run writes, bit for bit; a corrupt
entry is prepared again; two runs preparing at once both finish."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosslora.methods.matched import MatchedParams
from crosslora.pipeline import TransferOptions, transfer

SMALL = dict(n_texts=8, calibration_texts=4, text_tokens=24, min_positions=16)


@pytest.fixture
def pair(tiny_model, tiny_adapter):
    return tiny_adapter("llama"), tiny_model("llama"), tiny_model("gemma3_text")


def run(pair, out: Path, cache: Path | None, **params) -> dict:
    options = TransferOptions(params=MatchedParams(**{**SMALL, **params}), cache=cache is not None,
                              cache_dir=str(cache) if cache else None)  # fmt: skip
    return transfer(*map(str, pair), out, options, progress=False)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def same(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def entries(cache: Path) -> list[Path]:
    """The probes' entries (the fits' are beside them)."""
    return [p for p in (cache / "pairs").glob("*/*") if (p / "activations.bin").is_file()]


def fit_entries(cache: Path) -> list[Path]:
    return [p for p in (cache / "pairs").glob("*/*") if (p / "fit.bin").is_file()]


def fits(report: dict) -> dict:
    return report["method_diagnostics"]["pair_fits"]


def test_a_hit_writes_what_a_fresh_run_writes(pair, tmp_path):
    fresh = run(pair, tmp_path / "fresh", None)
    first = run(pair, tmp_path / "first", tmp_path / "cache")
    second = run(pair, tmp_path / "second", tmp_path / "cache")
    assert first["pair_cache"]["made"] == 1 and first["pair_cache"]["hits"] == 0
    assert second["pair_cache"]["hits"] == 1 and second["pair_cache"]["made"] == 0
    assert "pair_cache" not in fresh
    assert same(tmp_path / "first", tmp_path / "fresh")
    assert same(tmp_path / "second", tmp_path / "fresh")
    assert len(entries(tmp_path / "cache")) == 1
    # the fits: made by the first (and read again where two modules share one), every one read
    # by the second, none by a run with no cache
    assert fits(first)["made"] > 0
    assert fits(second) == {"read": sum(fits(first).values()), "made": 0}
    assert fits(fresh) == {"read": 0, "made": 0}
    assert len(fit_entries(tmp_path / "cache")) == fits(first)["made"]


def test_a_corrupt_fit_is_made_again(pair, tmp_path, caplog):
    first = run(pair, tmp_path / "first", tmp_path / "cache")
    damaged = sorted(fit_entries(tmp_path / "cache"))[0]
    raw = bytearray((damaged / "fit.bin").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (damaged / "fit.bin").write_bytes(bytes(raw))
    again = run(pair, tmp_path / "again", tmp_path / "cache")
    assert again["pair_cache"]["corrupt_remade"] == 1
    assert fits(again)["made"] == 1
    assert sum(fits(again).values()) == sum(fits(first).values())
    assert same(tmp_path / "again", tmp_path / "first")
    assert "is corrupt" in caplog.text


def test_other_parameters_are_another_entry(pair, tmp_path):
    run(pair, tmp_path / "a", tmp_path / "cache")
    other = run(pair, tmp_path / "b", tmp_path / "cache", seed=7)
    assert other["pair_cache"]["made"] == 1 and len(entries(tmp_path / "cache")) == 2
    # the ridge does not decide the preparation: the same entry
    ridge = run(pair, tmp_path / "c", tmp_path / "cache", alpha=0.1)
    assert ridge["pair_cache"]["hits"] == 1
    # but it decides the fits: made again, beside the first ridge's
    assert fits(ridge)["made"] == fits(other)["made"] > 0


@pytest.mark.parametrize("damage", ["activations", "manifest", "extra file"])
def test_a_corrupt_entry_is_prepared_again(pair, tmp_path, damage, caplog):
    run(pair, tmp_path / "first", tmp_path / "cache")
    (entry,) = entries(tmp_path / "cache")
    if damage == "activations":
        raw = bytearray((entry / "activations.bin").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (entry / "activations.bin").write_bytes(bytes(raw))
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{")
    else:
        (entry / "stray").write_text("x")
    again = run(pair, tmp_path / "again", tmp_path / "cache")
    assert again["pair_cache"]["corrupt_remade"] == 1 and again["pair_cache"]["made"] == 1
    assert same(tmp_path / "again", tmp_path / "first")
    third = run(pair, tmp_path / "third", tmp_path / "cache")
    assert third["pair_cache"]["hits"] == 1


def test_two_runs_preparing_at_once_both_finish(pair, tmp_path):
    cache = tmp_path / "cache"
    code = (
        "import sys; from crosslora import transfer, TransferOptions, MatchedParams; "
        f"transfer(*sys.argv[1:5], TransferOptions(params=MatchedParams(**{SMALL!r}), "
        f"cache_dir={str(cache)!r}), progress=False)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *map(str, pair), str(tmp_path / f"out{i}")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert same(tmp_path / "out0", tmp_path / "out1")
    assert len(entries(cache)) == 1 and not list((cache / "pairs").glob("*/.*"))


def test_a_pair_prepared_ahead_is_read_by_the_transfers(pair, tmp_path):
    """``prepare_pair`` (what ``--ray`` runs once before fanning out) fills the cache with the
    probe and every fit the adapter's modules read; the transfer then reads them, makes none,
    and writes what a fresh run writes."""
    from crosslora.pipeline import prepare_pair

    options = TransferOptions(params=MatchedParams(**SMALL), cache_dir=str(tmp_path / "cache"))
    stats = prepare_pair([str(pair[0])], str(pair[1]), str(pair[2]), options)
    assert stats["made"] == 1 and stats["hits"] == 0
    uses = sum(stats["pair_fits"].values())  # a fit dropped with its layer is read back later
    assert stats["pair_fits"]["made"] > 0
    again = prepare_pair([str(pair[0])], str(pair[1]), str(pair[2]), options)
    assert again["made"] == 0 and again["hits"] == 1
    assert again["pair_fits"] == {"read": uses, "made": 0}
    report = transfer(*map(str, pair), tmp_path / "out", options, progress=False)
    assert report["pair_cache"]["hits"] == 1 and report["pair_cache"]["made"] == 0
    assert fits(report) == {"read": uses, "made": 0}  # every one made ahead
    run(pair, tmp_path / "fresh", None)
    assert same(tmp_path / "out", tmp_path / "fresh")


def test_a_full_disk_keeps_no_fits_and_the_transfer_goes_on(pair, tmp_path, monkeypatch, caplog):
    """Writing a fit fails as on a full disk: the transfer finishes, writes what a run without
    the cache writes, and leaves no staging folder behind."""
    import errno

    from crosslora.methods.matched import entry

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(entry, "write_fit", full)
    report = run(pair, tmp_path / "out", tmp_path / "cache")
    run(pair, tmp_path / "fresh", None)
    assert same(tmp_path / "out", tmp_path / "fresh")
    assert "keeps no more fits" in caplog.text and "No space left" in caplog.text
    assert fits(report)["read"] == 0 and fit_entries(tmp_path / "cache") == []
    assert not list((tmp_path / "cache" / "pairs").glob("*/.*"))
