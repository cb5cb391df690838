"""``--draws N``: ``matched`` transfers with N independent probe texts and keeps the mean update,
cut back to the adapter's rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import transfer_argv
from crosslora import MatchedParams, TransferOptions, transfer
from crosslora.cli import main
from crosslora.io.peft_adapter import read_adapter
from crosslora.lora import LoraFactors

# different widths and depths (3 -> 4 layers), one source module per target module: the mean of
# the two written single-draw adapters is then what --draws 2 cuts back to rank r
PAIR = ("gemma3_text", "llama-deep")


def run(tiny_model, tiny_adapter, out: Path, *extra: str) -> int:
    src, tgt = PAIR
    return main(transfer_argv(tiny_adapter(src), tiny_model(src), tiny_model(tgt), out, "matched",
                              "-q", *extra))  # fmt: skip


def factors(adapter: Path) -> dict[str, LoraFactors]:
    read = read_adapter(adapter)
    return {m: read.factors(m).to("cpu", torch.float64) for m in read.modules}


def test_draws_keep_the_mean_update_of_independent_draws(tiny_model, tiny_adapter, tmp_path):
    """``--draws 2`` writes, module by module, the best rank-r approximation of the mean of the
    two updates that single transfers from probe seeds 0 and ``draw_stride`` write, and reports
    each draw's calibration."""
    assert run(tiny_model, tiny_adapter, tmp_path / "both", "--draws", "2") == 0
    assert run(tiny_model, tiny_adapter, tmp_path / "first") == 0
    params = MatchedParams()
    seeds = [params.seed, params.seed + params.draw_stride]
    src, tgt = PAIR
    options = TransferOptions(method="matched", params=MatchedParams(seed=seeds[1]))
    transfer(str(tiny_adapter(src)), str(tiny_model(src)), str(tiny_model(tgt)),
             tmp_path / "second", options, progress=False)  # fmt: skip
    both, first, second = (factors(tmp_path / n) for n in ("both", "first", "second"))
    assert both.keys() == first.keys() == second.keys()
    r = read_adapter(tmp_path / "both").r
    differ = 0.0
    for m, got in both.items():
        a, b = first[m].delta(), second[m].delta()
        differ = max(differ, float((a - b).norm() / a.norm()))
        mean = (a + b) / 2
        u, s, vh = torch.linalg.svd(mean)
        k = got.r
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert k <= max(first[m].r, second[m].r)
        assert float((got.delta() - best).norm() / best.norm()) < 1e-4, m
        assert got.r == r, (m, got.r)
    assert differ > 0.05, "the two draws must differ, or this test shows nothing"
    report = json.loads((tmp_path / "both" / "transfer_report.json").read_text())
    draws = report["method_diagnostics"]["draws"]
    assert [d["probe_seed"] for d in draws] == seeds
    assert all("calibration" in d and "probe_effect" in d for d in draws)
    assert report["settings"]["draws"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--draws", "0"], "--draws 0: must be at least 1"),
        (["--draws", "2", "--method", "anchored"], "--draws 2: only matched draws probe text"),
    ],
)
def test_bad_draws_are_one_clear_error(tiny_model, tiny_adapter, tmp_path, capsys, extra, message):
    assert run(tiny_model, tiny_adapter, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"crosslora: error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_dry_run_states_the_draws(tiny_model, tiny_adapter, tmp_path, capsys):
    assert run(tiny_model, tiny_adapter, tmp_path / "out", "--draws", "3", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "draws: 3 (the transfer runs 3 times with independent probe text" in out, out
    assert not (tmp_path / "out").exists()
