"""The command line fits a user's habits: every default and an example in the help, ``-q`` still
says where the output went, ``--threads``, and the plan and the last line say what to expect."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import transfer_argv
from crosslora.cli import build_parser, main
from crosslora.device import default_threads, set_threads
from crosslora.methods import METHODS, expectation

COMMANDS = ("transfer", "inspect", "eval", "bench", "models")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "\nexample:\n  crosslora " + command in text
    if command != "models":
        assert "--threads N" in text


def test_every_option_with_a_value_shows_its_default():
    """An option whose default is a value (not None or off) says it in its help."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    for name, p in sub.choices.items():
        text = " ".join(p.format_help().split())  # unwrapped
        for action in p._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                shown = str(action.default)
                assert f"default: {shown}" in text or f"default {shown}" in text, (name, action)


def test_quiet_still_prints_where_the_output_went(tiny_model, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    argv = transfer_argv(tiny_adapter("llama"), tiny_model("llama"), tiny_model("llama-twin"), out)
    capsys.readouterr()
    assert main([argv[0], "-q", *argv[1:]]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(out)]
    assert captured.err == ""


def test_threads_follow_the_option_then_omp_num_threads_then_the_affinity(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert default_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert default_threads() == len(os.sched_getaffinity(0))
        assert set_threads(None) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive(tiny_model, tiny_adapter, tmp_path, capsys):
    argv = transfer_argv(tiny_adapter("llama"), tiny_model("llama"), tiny_model("llama-twin"),
                         tmp_path / "o")  # fmt: skip
    capsys.readouterr()
    assert main([*argv, "--threads", "0"]) == 2
    assert "argument --threads: expected a positive integer, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "word"), [("matched", "expect"), ("cross-lora", "warning")])
def test_the_plan_says_what_to_expect_and_how_long(method, word, tiny_model, tiny_adapter,
                                                   tmp_path, capsys):  # fmt: skip
    argv = transfer_argv(tiny_adapter("llama"), tiny_model("llama"), tiny_model("qwen2"),
                         tmp_path / "o", method, "--dry-run")  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    said, warn = expectation(method)
    assert lines[-1] == f"{word}: {said}"
    assert warn == (word == "warning")
    assert any(line.startswith("time: about ") for line in lines)


def test_a_method_that_carries_almost_nothing_is_warned_about_after_the_transfer(
    tiny_model, tiny_adapter, tmp_path, capsys
):
    argv = transfer_argv(tiny_adapter("llama"), tiny_model("llama"), tiny_model("qwen2"),
                         tmp_path / "o", "crop-pad", "-q")  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {expectation('crop-pad')[0]}"]


def test_every_benchmarked_method_states_its_number():
    measured = {name: cls.recovered for name, cls in METHODS.items()}
    assert measured["matched"] == 0.272 and measured["cross-lora"] == 0.001
    assert "0.27 of a target-trained adapter's effect" in expectation("matched")[0]
    assert expectation("anchored") == (
        "anchored is not in the six-pair benchmark (docs/results.md): how much of the adapter "
        "survives is not measured", False)  # fmt: skip
