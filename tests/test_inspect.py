"""``crosslora inspect``: what ``matched`` (the default) and ``anchored`` see. Twins are seen as
the same model in other coordinates, unrelated models as less; matched's probe is left in the pair
cache for the transfer that follows; the odds place a pair among the benchmark's."""

from __future__ import annotations

import json

import pytest

from conftest import build_model, build_tokenizer
from crosslora.cli import main
from crosslora.inspect.odds import BENCHMARK, STATISTIC, Pair, odds, spearman
from crosslora.pipeline import TransferOptions, transfer
from twins import make_twin, twin_ready


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    src = twin_ready(build_model("llama"))
    src.save_pretrained(root / "src")
    make_twin(src, seed=5).save_pretrained(root / "twin")
    for folder in ("src", "twin"):
        build_tokenizer("llama").save_pretrained(root / folder)
    return root / "src", root / "twin"


def inspect(tmp_path, source, target, *extra) -> dict:
    tmp_path.mkdir(exist_ok=True)
    argv = ["inspect", "-q", str(source), str(target), "--json", str(tmp_path / "q.json"),
            "--cache-dir", str(tmp_path / "cache"), *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((tmp_path / "q.json").read_text())


def test_matched_sees_twins_as_one_model_and_writes_png(twins, tmp_path, capsys):
    result = inspect(tmp_path, *twins, "--png", str(tmp_path / "q.png"))
    out = capsys.readouterr().out
    assert "as matched sees them" in out and "odds: " in out
    assert result["method"] == "matched" and result["layer_map"]["kind"] == "merge"
    assert result["probe"]["aligned_share_source"] > 0.9  # one tokenizer: every token aligns
    assert [row["layer"] for row in result["layers"]] == [[0, 0], [1, 1]]
    # held out, a ridge of 1e-2 costs about 1 % of the reads; the isometry is exact
    for row in result["layers"]:
        assert all(row[f"read_{s}"] > 0.97 for s in ("attn_in", "attn_out", "mlp_in", "mlp_mid"))
        assert row["neurons"] > 0.97 and row["stream"] > 0.999, row
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_matched_sees_unrelated_models_as_less(tiny_model, twins, tmp_path):
    twin = inspect(tmp_path / "t", *twins)
    other = inspect(tmp_path / "o", tiny_model("llama"), tiny_model("gemma3_text"))
    for name, q in other["means"].items():
        assert q < twin["means"][name] - 0.1, (name, q, twin["means"][name])


def test_inspect_leaves_the_probe_for_the_transfer(tiny_model, tiny_adapter, tmp_path):
    """The probe inspect made is the one a default transfer between the same models reads."""
    src, tgt = tiny_model("llama"), tiny_model("gemma3_text")
    first = inspect(tmp_path, src, tgt)
    assert first["probe"]["prepared"] == "here"
    assert inspect(tmp_path, src, tgt)["probe"]["prepared"] == "read from the pair cache"
    options = TransferOptions(cache_dir=str(tmp_path / "cache"))
    report = transfer(str(tiny_adapter("llama")), str(src), str(tgt), tmp_path / "out", options,
                      progress=False)  # fmt: skip
    assert report["pair_cache"]["hits"] == 1 and report["pair_cache"]["made"] == 0


def test_anchored_sees_twins_as_perfectly_aligned(twins, tmp_path, capsys):
    result = inspect(tmp_path, *twins, "--method", "anchored")
    assert "shared vocabulary: 93 tokens (of 93 source, 93 target)" in capsys.readouterr().out
    assert len(result["modules"]) == 2 * 7
    assert all(m["quality"] >= 0.9999 for m in result["modules"]), result["modules"]


def test_anchored_scores_unrelated_models_lower(tiny_model, tmp_path):
    result = inspect(tmp_path, tiny_model("llama"), tiny_model("qwen2"), "--method", "anchored")
    assert result["anchors"]["shared_tokens"] == 88  # 5 words differ, ids shuffled
    assert result["layer_map"]["pairs"] == {"0": 0, "1": 2}
    assert max(m["quality"] for m in result["modules"]) < 0.9


BENCH = tuple(Pair(n, {STATISTIC: x}, r) for n, x, r in
              [("A", 0.1, 0.1), ("B", 0.2, 0.15), ("C", 0.3, 0.3), ("D", 0.4, 0.2)])  # fmt: skip
FLAT = tuple(Pair(n, {STATISTIC: x}, r) for n, x, r in
             [("A", 0.1, 0.3), ("B", 0.2, 0.1), ("C", 0.3, 0.2), ("D", 0.4, 0.15)])  # fmt: skip


def test_odds_place_a_pair_among_the_benchmark():
    assert spearman([1, 2, 3, 4], [2, 4, 6, 8]) == 1.0
    assert spearman([1, 2, 3, 4], [8, 6, 4, 2]) == -1.0
    assert spearman([0.1, 0.2, 0.3, 0.4], [0.1, 0.15, 0.3, 0.2]) == pytest.approx(0.8)
    low = odds({STATISTIC: 0.05}, BENCH)
    assert "below every benchmark pair, poor odds" in low["says"]
    assert low["nearest"] == ["A", "B"] and low["rank_correlation"] == pytest.approx(0.8)
    assert "above every benchmark pair, good odds" in odds({STATISTIC: 0.5}, BENCH)["says"]
    assert "upper half, good odds" in odds({STATISTIC: 0.33}, BENCH)["says"]
    assert "lower half, poorer odds" in odds({STATISTIC: 0.12}, BENCH)["says"]
    assert odds({STATISTIC: 0.33}, BENCH)["nearest"] == ["C", "D"]
    assert "nearly all of the adapter" in odds({STATISTIC: 0.99}, BENCH)["says"]
    assert "no benchmark figures" in odds({STATISTIC: 0.3}, ())["says"]


def test_odds_say_nothing_good_or_poor_where_the_figure_does_not_rank_pairs():
    inside, outside = odds({STATISTIC: 0.25}, FLAT), odds({STATISTIC: 0.05}, FLAT)
    assert inside["rank_correlation"] < 0.5
    assert "within the benchmark's range" in inside["says"]
    assert "outside the benchmark's range" in outside["says"]
    for said in (inside["says"], outside["says"]):
        assert "does not rank pairs" in said and "poor" not in said and "good" not in said


def test_the_shipped_benchmark_figures_are_the_six_pairs():
    assert sorted(p.name for p in BENCHMARK) == ["G->Q", "G->S", "Q->G", "Q->S", "S->G", "S->Q"]
    assert all(0 <= p.means[STATISTIC] <= 1 and 0 < p.recovered < 1 for p in BENCHMARK)


def test_every_method_is_told_what_the_benchmark_measured(tiny_model, tmp_path, capsys):
    """matched and anchored are measured; for the others inspect says what the benchmark
    measured, and warns for one that carries almost nothing."""
    result = inspect(tmp_path, tiny_model("llama"), tiny_model("qwen2"), "--method", "cross-lora")
    out = capsys.readouterr().out
    assert result["expectation"]["warning"] and "layers" not in result and "modules" not in result
    assert "warning: on the six-pair benchmark cross-lora recovered 0.00" in out
    assert "inspect measures what matched and anchored see" in out


def test_matched_says_what_to_expect(twins, tmp_path, capsys):
    inspect(tmp_path, *twins)
    assert "expect: on the six-pair benchmark matched recovered 0.27" in capsys.readouterr().out


def test_no_heatmap_for_a_method_inspect_does_not_measure(tiny_model, tmp_path, capsys):
    argv = ["inspect", str(tiny_model("llama")), str(tiny_model("qwen2")), "--method", "crop-pad",
            "--png", str(tmp_path / "q.png")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["crosslora: error: --png: inspect measures nothing to plot for crop-pad "
                   "(only for matched and anchored)"]  # fmt: skip
    assert not (tmp_path / "q.png").exists()
