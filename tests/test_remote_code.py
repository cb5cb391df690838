"""No foreign code ever runs: not a model folder's Python, not a pickle's.

An "evil" folder is a tiny Llama whose ``config.json`` names an unknown ``model_type`` with an
``auto_map`` to ``configuration_evil`` / ``modeling_evil`` in the folder, and whose
``tokenizer_config.json`` maps ``AutoTokenizer`` to ``tokenization_evil``: each of those files
writes a marker file when imported. Every command that can load a model is run as a subprocess
with ``y`` answered on standard input; each must refuse in one line (exit 2), never prompt,
never write the marker, and leave its inputs as they were.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch

from conftest import copy_folder, pickle_adapter, snapshot, transfer_argv, word
from crosslora.cli import main
from crosslora.errors import CrossLoraError

CLI = Path(sys.executable).with_name("crosslora")
SRC = Path(__file__).resolve().parents[1] / "src"
EVIL_FILES = ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py")
REFUSAL = re.compile(r"needs Python code from its own folder.*never runs code from a model folder")


# --- inputs ---------------------------------------------------------------------------------


def make_evil(good: Path, folder: Path, marker: Path, which: str = "both") -> Path:
    """A copy of ``good`` whose config (``model``), tokenizer (``tok``) or both map to Python
    files in the folder; importing any of them creates ``marker``."""

    def evil_config(config: dict) -> None:
        config.update(
            model_type="crosslora_evil",
            architectures=["EvilForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
            },
        )

    copy_folder(good, folder, evil_config if which in ("model", "both") else None)
    if which in ("tok", "both"):
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok.update(
            tokenizer_class="EvilTokenizer",
            auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        )
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    plant = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('foreign code ran')\n"
    classes = {
        "configuration_evil.py": "from transformers import LlamaConfig\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'crosslora_evil'\n",
        "modeling_evil.py": "from transformers import LlamaForCausalLM\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n",
        "tokenization_evil.py": "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n",
    }
    for name in EVIL_FILES:
        (folder / name).write_text(plant + classes[name])
    return folder


def make_task(folder: Path) -> Path:
    """A three-item multiple-choice task in the tiny tokenizers' words."""
    rows = [
        {"q": f"{word(i)} {word(i + 1)}", "options": [word(i + 2), word(i + 5)], "answer": i % 2}
        for i in range(3)
    ]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "qa", "text": "{q}", "choices": "options", "gold": "answer",
            "files": {"validation": "qa.jsonl"}}  # fmt: skip
    (folder / "qa.json").write_text(json.dumps(task))
    return folder / "qa.json"


def snapshots(*roots: Path) -> dict[str, dict[str, bytes | None]]:
    """``snapshot`` of every folder in ``roots`` (new files and removed ones show as well)."""
    assert all(root.is_dir() for root in roots), roots
    return {str(root): snapshot(root) for root in roots}


class Inputs:
    def __init__(self, tmp: Path, tiny_model, tiny_adapter) -> None:
        self.tmp = tmp
        self.marker = tmp / "MARKER"
        self.good = tiny_model("llama")
        self.adapter = tiny_adapter("llama")
        inputs = tmp / "inputs"
        inputs.mkdir()
        self.evil = make_evil(self.good, inputs / "evil", self.marker)
        self.eviltok = make_evil(self.good, inputs / "eviltok", self.marker, which="tok")
        self.task = make_task(inputs)
        self.roots = (inputs, self.good, self.adapter)

    def bench_config(self, source: Path, target: Path, adapter: Path | None = None) -> Path:
        adapter = adapter or self.adapter
        cfg = {
            "models": {"s": {"path": str(source), "adapter": str(adapter)},
                       "t": {"path": str(target), "adapter": str(adapter)}},
            "pairs": [["s", "t"]],
            "methods": ["copy"],
            "tasks": [str(self.task)],
        }  # fmt: skip
        path = self.tmp / "inputs" / f"bench-{source.name}-{target.name}.json"
        path.write_text(json.dumps(cfg))
        return path


@pytest.fixture
def env(tmp_path, tiny_model, tiny_adapter) -> Inputs:
    return Inputs(tmp_path, tiny_model, tiny_adapter)


# --- the console script, answering "y" to any prompt ----------------------------------------


def run_cli(env: Inputs, argv: list[str]) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines as a terminal shows them, progress bars dropped)."""
    hf = env.tmp / "hf"
    offline = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(hf),
        "HF_HUB_CACHE": str(hf / "hub"),
        "HF_MODULES_CACHE": str(hf / "modules"),
        "PYTHONPATH": str(SRC),
    }
    cmd = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "crosslora"]
    proc = subprocess.run(
        [*cmd, *argv], input="y\n" * 20, capture_output=True, text=True, timeout=300,
        cwd=env.tmp, env={**os.environ, **offline},
    )  # fmt: skip
    visible = [line.rsplit("\r", 1)[-1] for line in proc.stderr.split("\n")]
    lines = [line for line in visible if line.strip() and not re.search(r"\d+%\|", line)]
    copied = [p for p in hf.rglob("*_evil.py")] if hf.exists() else []
    assert copied == [], f"transformers copied the folder's code: {copied}"
    return proc.returncode, proc.stdout, lines


CLI_CASES = {
    "eval-evil-model": lambda e: ["eval", "--model", e.evil, "--tasks", e.task, "--device", "cpu"],
    "eval-evil-tokenizer": lambda e: ["eval", "--model", e.eviltok, "--tasks", e.task],
    "eval-evil-model-with-adapter": lambda e: [
        "eval", "--model", e.evil, "--adapter", e.adapter, "--tasks", e.task],
    "transfer-evil-source": lambda e: transfer_argv(e.adapter, e.evil, e.good, e.tmp / "out", None),
    "transfer-evil-target": lambda e: transfer_argv(e.adapter, e.good, e.evil, e.tmp / "out", None),
    "transfer-evil-tokenizer-anchored": lambda e: transfer_argv(
        e.adapter, e.good, e.eviltok, e.tmp / "out", "anchored"),
    "inspect-evil-source": lambda e: ["inspect", e.evil, e.good],
    "inspect-evil-target": lambda e: ["inspect", e.good, e.evil],
    "bench-evil-source": lambda e: [
        "bench", e.bench_config(e.evil, e.good), "--out", e.tmp / "out"],
    "bench-evil-target": lambda e: [
        "bench", e.bench_config(e.good, e.evil), "--out", e.tmp / "out"],
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_a_folder_that_needs_its_own_code_is_refused_in_one_line(env, case):
    argv = [str(a) for a in CLI_CASES[case](env)]
    before = snapshots(*env.roots)
    rc, stdout, lines = run_cli(env, argv)
    assert not env.marker.exists(), f"{case}: the folder's code ran"
    assert rc == 2, (case, rc, lines)
    assert len(lines) == 1 and lines[0].startswith("crosslora: error: "), (case, lines)
    assert REFUSAL.search(lines[0]), lines[0]
    assert "trust_remote_code" not in lines[0] and "[y/N]" not in stdout + lines[0]
    assert "Traceback" not in stdout and stdout == "", (case, stdout)
    assert snapshots(*env.roots) == before, f"{case}: an input changed"
    assert not (env.tmp / "out" / "adapter_model.safetensors").exists()


def test_an_adapter_naming_an_evil_base_loads_on_the_given_model(env, tmp_path):
    """``eval`` loads the adapter on ``--model``; the adapter's own base_model_name_or_path
    (here the evil folder, its code beside the weights too) is never followed."""
    adapter = copy_folder(env.adapter, tmp_path / "inputs" / "adapter",
                          lambda c: c.update(base_model_name_or_path=str(env.evil)))  # fmt: skip
    for name in EVIL_FILES:
        shutil.copy(env.evil / name, adapter)
    before = snapshots(*env.roots)
    rc, stdout, lines = run_cli(env, ["eval", "--model", str(env.good), "--adapter",
                                      str(adapter), "--tasks", str(env.task), "-q"])  # fmt: skip
    assert rc == 0, lines
    assert "qa" in stdout and "acc" in stdout
    assert not env.marker.exists()
    assert snapshots(*env.roots) == before


def test_the_marker_appears_when_the_folders_code_is_imported(env):
    """The control: the planted files do write the marker when run, so its absence above
    means they were not run."""
    for name in EVIL_FILES:
        env.marker.unlink(missing_ok=True)
        runpy.run_path(str(env.evil / name))
        assert env.marker.read_text() == "foreign code ran", name
    env.marker.unlink()


# --- the loading helpers, in process, with "y" ready on standard input ----------------------


@pytest.fixture
def answers_yes(monkeypatch):
    """stdin full of "y" and an ``input`` that answers "y"; the list records every prompt."""
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 20))
    return asked


def _loaders():
    from crosslora.io.pretrained import (
        load_causal_lm,
        load_model,
        load_tokenizer,
        refuse_remote_code,
        require_tokenizer,
    )

    return {
        "load_causal_lm": lambda f: load_causal_lm(f, "model", dtype=torch.float32),
        "load_tokenizer": lambda f: load_tokenizer(f, "model"),
        "refuse_remote_code": lambda f: refuse_remote_code(f, "model"),
        "stream.load_model": lambda f: load_model(f, torch.device("cpu"), "source model"),
        "require_tokenizer": lambda f: require_tokenizer(f, "target model"),
        "eval.load_model": lambda f: __import__("crosslora.cli.eval", fromlist=["x"]).load_model(
            str(f), None, torch.device("cpu"), torch.float32, quiet=True
        ),
    }


@pytest.mark.parametrize("loader", list(_loaders()))
@pytest.mark.parametrize("which", ["evil", "eviltok"])
def test_the_loading_helpers_refuse_without_asking(env, answers_yes, loader, which):
    folder = getattr(env, which)
    load = _loaders()[loader]
    if loader == "refuse_remote_code" and which == "eviltok":
        load(folder)  # only config.json is read up front; the tokenizer's is refused on loading
        return
    if loader in ("load_causal_lm", "stream.load_model") and which == "eviltok":
        model = load(folder)  # a Llama config: transformers' own class, no code of the folder's
        assert type(model).__name__ == "LlamaForCausalLM"
    else:
        with pytest.raises(CrossLoraError, match=REFUSAL.pattern) as info:
            load(folder)
        assert "\n" not in str(info.value) and "trust_remote_code" not in str(info.value)
    assert answers_yes == []
    assert not env.marker.exists()


def test_a_known_model_type_with_an_auto_map_loads_transformers_own_class(env, answers_yes):
    """An ``auto_map`` beside a model_type that transformers knows is ignored, not run."""
    from crosslora.io.pretrained import load_causal_lm

    folder = env.tmp / "known"
    make_evil(env.good, folder, env.marker, which="tok")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_causal_lm(folder, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert answers_yes == [] and not env.marker.exists()


def test_bench_loads_no_evil_model(env, answers_yes, tmp_path):
    """bench's own loading, which its transfers keep a CLI run from reaching."""
    from crosslora.bench import BenchConfig, Runner

    config = BenchConfig.from_json(env.bench_config(env.good, env.evil))
    runner = Runner(config, tmp_path / "out", progress=False)
    with pytest.raises(CrossLoraError, match=REFUSAL.pattern):
        runner.evaluate("t", None)
    assert answers_yes == [] and not env.marker.exists()


# --- every from_pretrained in src/ passes trust_remote_code=False ---------------------------


def pretrained_calls(source: str) -> list[tuple[str, bool]]:
    """Every ``from_pretrained(...)`` call in Python ``source`` (strings and comments aside),
    with whether it passes ``trust_remote_code=False``."""
    code = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            code.append('""')
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code.append(tok.string)
    text = " ".join(code)
    calls = []
    for m in re.finditer(r"\bfrom_pretrained\s*\(", text):
        depth, end = 1, m.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        args = re.sub(r"\s+", "", text[m.end() : end - 1])
        safe = re.search(r"(^|,)trust_remote_code=False(,|$)", args) is not None
        calls.append((text[m.start() : end], safe))
    return calls


def unsafe_calls(source: str) -> list[str]:
    return [call for call, safe in pretrained_calls(source) if not safe]


def test_the_scanner_finds_a_call_without_the_keyword():
    bad = """
import transformers
m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=float)
t = AutoTokenizer.from_pretrained(
    path,
    trust_remote_code=True,
)
c = AutoConfig.from_pretrained(path, trust_remote_code=(False))
"""
    good = '''
"""PeftModel.from_pretrained(model, "<folder>") in a docstring is text, not a call."""
m = AutoModelForCausalLM.from_pretrained(f(path), trust_remote_code=False, dtype=float)
# AutoTokenizer.from_pretrained(path) in a comment
t = AutoTokenizer.from_pretrained(
    str(path), trust_remote_code = False
)
'''
    assert len(unsafe_calls(bad)) == 3
    assert len(pretrained_calls(good)) == 2 and unsafe_calls(good) == []


def test_every_from_pretrained_in_src_passes_trust_remote_code_false():
    files = sorted((SRC / "crosslora").rglob("*.py"))
    calls = {str(f.relative_to(SRC)): unsafe_calls(f.read_text()) for f in files}
    assert {f: c for f, c in calls.items() if c} == {}
    helpers = pretrained_calls((SRC / "crosslora" / "io" / "pretrained.py").read_text())
    assert len(helpers) == 4  # the scanner sees the calls (model, config, tokenizer, PEFT adapter)


# --- pickles: the same policy as transfer's --allow-pickle ----------------------------------


class Evil:
    """A pickle that, loaded without ``weights_only``, would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "foreign code ran"))


def eval_argv(env: Inputs, adapter: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(env.good), "--adapter", str(adapter), "--tasks",
            str(env.task), "-q", *extra]  # fmt: skip


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model or adapter load through the helpers fails the test (the tokenizer may load)."""
    import crosslora.io.pretrained as pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pretrained, "load_causal_lm", refuse)
    monkeypatch.setattr(pretrained, "load_peft_adapter", refuse)


def test_eval_refuses_a_pickle_adapter_without_allow_pickle(env, capsys, no_model_loads):
    adapter = pickle_adapter(env.adapter, env.tmp / "pickled")
    assert main(eval_argv(env, adapter)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosslora: error: ") and "\n" not in err
    assert "--allow-pickle" in err and "weights_only=False" not in err


def test_eval_with_allow_pickle_scores_like_the_safetensors_adapter(env, capsys):
    adapter = pickle_adapter(env.adapter, env.tmp / "pickled")
    results = {}
    for name, folder, extra in [("safetensors", env.adapter, ()),
                                ("pickle", adapter, ("--allow-pickle",))]:  # fmt: skip
        out = env.tmp / f"{name}.json"
        assert main(eval_argv(env, folder, *extra, "--output", str(out))) == 0
        results[name] = json.loads(out.read_text())["tasks"]["qa"]["items"]
    assert [r["loglik"] for r in results["pickle"]] == [r["loglik"] for r in results["safetensors"]]
    assert "qa" in capsys.readouterr().out


@pytest.mark.parametrize("payload", ["getcwd", "marker"])
def test_eval_refuses_a_pickle_that_carries_code_even_with_allow_pickle(
    env, capsys, no_model_loads, payload
):
    code = {"x": os.getcwd} if payload == "getcwd" else {"x": Evil(env.marker)}
    adapter = pickle_adapter(env.adapter, env.tmp / "pickled", payload=code)
    before = snapshots(*env.roots, adapter)
    assert main(eval_argv(env, adapter, "--allow-pickle")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosslora: error: ") and "\n" not in err, err
    assert "weights_only=True" in err and "weights_only=False" not in err
    assert not env.marker.exists()
    assert snapshots(*env.roots, adapter) == before


def test_eval_code_pickle_through_the_console_script_is_one_line(env):
    adapter = pickle_adapter(env.adapter, env.tmp / "pickled", payload={"x": Evil(env.marker)})
    rc, stdout, lines = run_cli(env, eval_argv(env, adapter, "--allow-pickle"))
    assert rc == 2 and stdout == "" and len(lines) == 1, lines
    assert lines[0].startswith("crosslora: error: ") and "weights_only=False" not in lines[0]
    assert not env.marker.exists()


def test_bench_refuses_pickle_adapters(env, capsys, no_model_loads):
    """bench has no --allow-pickle: an adapter_model.bin-only adapter is refused up front."""
    from crosslora.bench import refuse_pickle_adapter

    with pytest.raises(CrossLoraError, match="adapter_model.bin"):  # its evaluations' own guard
        refuse_pickle_adapter(pickle_adapter(env.adapter, env.tmp / "bin"), "t")
    adapter = pickle_adapter(env.adapter, env.tmp / "inputs" / "pickled")
    config = env.bench_config(env.good, env.good, adapter=adapter)
    assert main(["bench", "-q", str(config), "--out", str(env.tmp / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosslora: error: ") and "\n" not in err
    assert "adapter_model.bin" in err and "adapter_model.safetensors" in err
    assert "weights_only=False" not in err
    assert not list((env.tmp / "out").glob("adapters/*"))


def test_no_message_in_src_advises_weights_only_false():
    """No raise, log or print in src/ says ``weights_only=False`` (docstrings may explain)."""
    said = {"print", "debug", "info", "warning", "error", "exception", "critical"}
    hits = []
    for f in sorted((SRC / "crosslora").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            call = isinstance(node, ast.Call) and (
                getattr(node.func, "attr", None) in said or getattr(node.func, "id", None) in said
            )
            if (isinstance(node, ast.Raise) or call) and "weights_only=False" in ast.unparse(node):
                hits.append(f"{f.relative_to(SRC)}:{node.lineno}")
    assert hits == []
