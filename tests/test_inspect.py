"""``crosslora inspect``: alignment quality is 1 on twins and lower on unrelated models."""

from __future__ import annotations

import json

from conftest import build_model, build_tokenizer
from crosslora.cli import main
from twins import make_twin, twin_ready


def test_inspect_sees_twins_as_perfectly_aligned_and_writes_png(tmp_path, capsys):
    src = twin_ready(build_model("llama"))
    src.save_pretrained(tmp_path / "src")
    make_twin(src, seed=5).save_pretrained(tmp_path / "twin")
    for folder in ("src", "twin"):
        build_tokenizer("llama").save_pretrained(tmp_path / folder)
    capsys.readouterr()
    argv = ["inspect", "-q", str(tmp_path / "src"), str(tmp_path / "twin"),
            "--png", str(tmp_path / "q.png"), "--json", str(tmp_path / "q.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "shared vocabulary: 93 tokens (of 93 source, 93 target)" in out
    result = json.loads((tmp_path / "q.json").read_text())
    assert len(result["modules"]) == 2 * 7
    assert all(m["quality"] >= 0.9999 for m in result["modules"]), result["modules"]
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_scores_unrelated_models_lower(tiny_model, tmp_path, capsys):
    argv = [
        "inspect",
        "-q",
        str(tiny_model("llama")),
        str(tiny_model("qwen2")),
        "--json",
        str(tmp_path / "q.json"),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["anchors"]["shared_tokens"] == 88  # 5 words differ, ids shuffled
    assert result["layer_map"]["pairs"] == {"0": 0, "1": 2}
    assert max(m["quality"] for m in result["modules"]) < 0.9
