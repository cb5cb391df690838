"""Bad inputs to ``eval``, ``bench`` and ``inspect``: exit 2, one line ``crosslora: error: ...``
that names the file, field or option, no traceback, and nothing written or changed.

Every case runs in-process with the expensive parts replaced by a function that fails the test
("must not be reached"): loading the model (eval), transfers, evaluations, pulls and the bench
runner (bench), the alignment itself (inspect). So each check is shown to happen before any work.
A few cases also run through the console script, where a library warning would show on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import word
from crosslora.cli import main
from test_bad_inputs import CLI, SRC

# --- the inputs each case starts from --------------------------------------------------------------


def rows(n: int = 6) -> list[dict]:
    return [{"q": f"{word(i)} {word(i + 1)}", "options": [word(i + 2), f"{word(i + 3)} {word(4)}",
             word(9)], "answer": i % 3} for i in range(n)]  # fmt: skip


class Env:
    """Inputs under ``tmp/in`` (a llama and a mistral with their adapters, a task, a bench config
    with paths relative to its folder); outputs go under ``tmp/work``."""

    def __init__(self, tmp: Path, tiny_model, tiny_adapter) -> None:
        self.tmp, self.inputs, self.work = tmp, tmp / "in", tmp / "work"
        self.inputs.mkdir()
        self.work.mkdir()
        self.out = self.work / "out"
        self._tiny_model, self._tiny_adapter = tiny_model, tiny_adapter
        self.model = self.copy(tiny_model("llama"), "model")
        self.adapter = self.copy(tiny_adapter("llama"), "adapter")
        self.model2 = self.copy(tiny_model("mistral"), "model2")
        self.adapter2 = self.copy(tiny_adapter("mistral"), "adapter2")
        self.task = self.make_task("qa")

    def copy(self, folder: Path, name: str) -> Path:
        return Path(shutil.copytree(folder, self.inputs / name))

    def foreign_adapter(self) -> Path:
        return self.copy(self._tiny_adapter("qwen2"), "qwen2-adapter")

    def make_task(self, name: str, data: list[dict] | None = None, **spec) -> Path:
        (self.inputs / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in (rows() if data is None else data))
        )
        task = {"name": name, "text": "{q}", "choices": "options", "gold": "answer",
                "files": {"validation": f"{name}.jsonl"}, **spec}  # fmt: skip
        path = self.inputs / f"{name}.json"
        path.write_text(json.dumps(task))
        return path

    def raw_task(self, text: str) -> Path:
        path = self.inputs / "raw.json"
        path.write_text(text)
        return path

    def eval(self, *extra, tasks: Path | str | None = None) -> list[str]:
        return ["eval", "-q", "--model", str(self.model), "--device", "cpu",
                "--tasks", str(tasks or self.task), *extra]  # fmt: skip

    def bench(self, edit: Callable[[dict], object] | None = None, text: str | None = None,
              out: Path | None = None) -> list[str]:  # fmt: skip
        config = {
            "models": {"a": {"path": "model", "adapter": "adapter"},
                       "b": {"path": "model2", "adapter": "adapter2"}},
            "pairs": "all", "methods": ["copy"], "tasks": ["qa.json"],
            "limit": 4, "batch_size": 4, "n_resamples": 50,
        }  # fmt: skip
        if edit:
            edit(config)
        path = self.inputs / "bench.json"
        path.write_text(text if text is not None else json.dumps(config))
        return ["bench", "-q", str(path), "--out", str(out or self.out)]

    @property
    def config(self) -> Path:
        return self.inputs / "bench.json"

    def inspect(self, *extra) -> list[str]:
        return ["inspect", "-q", str(self.model), str(self.model2), *extra]


def pop(key: str) -> Callable[[dict], object]:
    return lambda c: c.pop(key)


def put(**kw) -> Callable[[dict], object]:
    return lambda c: c.update(kw)


def model_entry(name: str, **kw) -> Callable[[dict], object]:
    return lambda c: c["models"].__setitem__(name, kw)


def no_write_permission(e: Env) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits")
    locked = e.work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked


def fifo(path: Path) -> Path:
    """A FIFO at ``path``. Were it ever opened for reading, the reader would wait for a writer
    forever: a thread opens it for writing for a while after 20 s, so such a test fails, not
    hangs."""
    os.mkfifo(path)

    def unblock() -> None:
        time.sleep(20)
        for _ in range(100):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader (the right outcome) or gone
                time.sleep(0.1)

    threading.Thread(target=unblock, daemon=True).start()
    return path


def afile(e: Env) -> Path:
    (e.work / "afile").write_text("keep me")
    return e.work / "afile"


# --- the table: name -> build(env) -> (argv, fragment of the error line) --------------------------

Build = Callable[[Env], tuple[list[str], str]]

EVAL: dict[str, Build] = {
    "task-file-is-a-json-list": lambda e: (
        e.eval(tasks=(p := e.raw_task('[{"name": "qa"}]'))),
        f"task file {p} must hold a JSON object (got a list)"),
    "task-file-invalid-json": lambda e: (
        e.eval(tasks=(p := e.raw_task('{"name": '))), f"cannot read task file {p}"),
    "task-file-unknown-key": lambda e: (
        e.eval(tasks=(p := e.make_task("qa2", choises="x"))),
        f"task file {p}: unknown keys choises (known: "),
    "task-file-missing-keys": lambda e: (
        e.eval(tasks=(p := e.raw_task('{"name": "x", "text": "{q}"}'))),
        f"task file {p}: missing keys choices, gold"),
    "task-file-files-a-list": lambda e: (
        e.eval(tasks=(p := e.make_task("qa2", files=["qa2.jsonl"]))),
        f"task file {p}: files must be an object"),
    "task-file-gold-format-unknown": lambda e: (
        e.eval(tasks=e.make_task("qa2", gold_format="letter")),
        "gold_format must be one of index, index1, label, bool (got \"letter\")"),
    "task-file-preprocess-unknown": lambda e: (
        e.eval(tasks=e.make_task("qa2", preprocess="nope")),
        "preprocess must be null or one of hellaswag, winogrande"),
    "choice-empty": lambda e: (
        e.eval(tasks=e.make_task("qa2", [{"q": "wa", "options": ["wb", ""], "answer": 0}])),
        f"task qa2 (validation, {e.inputs / 'qa2.jsonl'}) row 0: choice 1 is empty"),
    "continuation-encodes-to-no-tokens": lambda e: (
        e.eval(tasks=e.make_task("qa2", [{"q": "", "options": ["wa wb", "wc"], "answer": 0}],
                                 multiple_input=True, target_delimiter="")),
        f"task qa2 (validation, {e.inputs / 'qa2.jsonl'}) item 0 choice 0 ('' after 'wa wb'): "
        "a continuation encodes to no tokens"),
    "task-file-is-a-fifo": lambda e: (
        e.eval(tasks=(p := fifo(e.inputs / "pipe.json"))),
        f"cannot read task file {p}: a FIFO, not a regular file"),
    "data-file-empty": lambda e: (
        e.eval(tasks=e.make_task("qa2", [])), "task qa2 (validation, "),
    "data-row-gold-out-of-range": lambda e: (
        e.eval(tasks=e.make_task("qa2", [{"q": "wa", "options": ["wb"], "answer": 3}])),
        "row 0: gold index 3 out of range for 1 choices"),
    "adapter-for-another-model": lambda e: (
        e.eval("--adapter", str(a := e.foreign_adapter())),
        f"adapter {a} does not fit model {e.model}: model.layers.0.mlp.down_proj has ΔW shape "
        "(40, 72), the model's weight is (32, 64)"),
    "adapter-folder-missing": lambda e: (
        e.eval("--adapter", str(e.inputs / "nope")), f"--adapter {e.inputs / 'nope'}: no such"),
    "adapter-without-config": lambda e: (
        (e.adapter / "adapter_config.json").unlink(), e.eval("--adapter", str(e.adapter)),
        f"--adapter {e.adapter}: no adapter_config.json there")[1:],
    "model-missing": lambda e: (
        e.eval()[:3] + [str(e.inputs / "nope")] + e.eval()[4:],
        f"--model {e.inputs / 'nope'}: not a model folder"),
    "limit-zero": lambda e: (e.eval("--limit", "0"), "--limit must be at least 1"),
    "limit-negative": lambda e: (e.eval("--limit", "-3"), "--limit must be at least 1"),
    "batch-size-zero": lambda e: (e.eval("--batch-size", "0"), "--batch-size must be at least 1"),
    "unknown-task": lambda e: (e.eval(tasks="nope"), "unknown task 'nope'; known: arc_easy"),
    "tasks-name-nothing": lambda e: (e.eval(tasks=","), "--tasks ',' names no task"),
    "task-given-twice": lambda e: (
        e.eval(tasks=f"{e.task},{e.task}"), "task qa is given twice"),
    "split-the-task-lacks": lambda e: (
        e.eval("--split", "test"), "no test split for qa (it has validation)"),
    "split-unknown": lambda e: (
        e.eval("--split", "train"), "argument --split: invalid choice: 'train'"),
    "device-unknown": lambda e: (e.eval("--device", "tpu9"), "--device tpu9: not a device"),
    "device-meta": lambda e: (e.eval("--device", "meta"), "--device meta: not supported"),
    "output-folder-missing": lambda e: (
        e.eval("--output", str(e.work / "no" / "r.json")),
        f"--output {e.work / 'no' / 'r.json'}: folder {e.work / 'no'} does not exist"),
    "output-is-a-folder": lambda e: (
        e.eval("--output", str(e.work)), f"--output {e.work} is a folder; name a file"),
    "output-parent-is-a-file": lambda e: (
        e.eval("--output", str(afile(e) / "r.json")), f"{e.work / 'afile'} is a file, not a folder"),
    "output-parent-not-writable": lambda e: (
        e.eval("--output", str(no_write_permission(e) / "r.json")), "no permission to write in"),
    "output-is-the-model-config": lambda e: (
        e.eval("--output", str(e.model / "config.json")),
        f"--output {e.model / 'config.json'} is the model file"),
    "output-is-the-adapter-weights": lambda e: (
        e.eval("--adapter", str(e.adapter), "--output", str(e.adapter / "adapter_model.safetensors")),
        "is the adapter file"),
    "output-is-the-task-file": lambda e: (
        e.eval("--output", str(e.task)), f"--output {e.task} is the task file"),
    "output-is-the-task-data": lambda e: (
        e.eval("--output", str(e.inputs / "qa.jsonl")), "is the data file of task qa"),
}  # fmt: skip

BENCH: dict[str, Build] = {
    "config-missing": lambda e: (
        ["bench", "-q", str(e.inputs / "none.json"), "--out", str(e.out)],
        f"bench config: {e.inputs / 'none.json'} not found"),
    "config-a-json-list": lambda e: (e.bench(text="[]"), "must hold a JSON object"),
    "unknown-key": lambda e: (
        e.bench(put(limits=4)),
        "bench.json: unknown keys limits (known: models, pairs, methods, tasks, split, limit,"),
    "methods-missing": lambda e: (e.bench(pop("methods")), "bench.json: missing keys methods"),
    "models-a-list": lambda e: (
        e.bench(put(models=[{"path": "model"}])), "bench.json: models: must be a non-empty object"),
    "model-entry-without-path": lambda e: (
        e.bench(model_entry("a", adapter="adapter")), "models.a: has no path"),
    "model-entry-unknown-key": lambda e: (
        e.bench(model_entry("a", path="model", adpater="adapter")),
        "models.a: unknown keys adpater (known: path, adapter)"),
    "model-path-not-a-string": lambda e: (
        e.bench(model_entry("a", path=["model"], adapter="adapter")),
        "models.a.path: must be a folder or pull:NAME (got [\"model\"])"),
    "model-path-missing": lambda e: (
        e.bench(model_entry("a", path="gone", adapter="adapter")),
        f"models.a.path: {e.inputs / 'gone'}: no such folder"),
    "model-path-not-a-model": lambda e: (
        e.bench(model_entry("a", path="adapter", adapter="adapter")),
        f"models.a.path: {e.adapter} is not a model folder (no config.json)"),
    "model-pull-unknown": lambda e: (
        e.bench(model_entry("a", path="pull:gpt-9", adapter="adapter")),
        "models.a.path: unknown model 'gpt-9'; known models: smollm2-135m"),
    "adapter-not-a-string": lambda e: (
        e.bench(model_entry("a", path="model", adapter=3)),
        "models.a.adapter: must be an adapter folder or null (got 3)"),
    "adapter-missing": lambda e: (
        e.bench(model_entry("a", path="model", adapter="~/gone")),
        f"models.a.adapter: {Path('~/gone').expanduser()}: no such folder"),
    "adapter-pickle-only": lambda e: (
        (e.adapter / "adapter_model.safetensors").rename(e.adapter / "adapter_model.bin"),
        e.bench(), f"models.a.adapter: {e.adapter}: no adapter_model.safetensors (it has "
        "adapter_model.bin")[1:],
    "paired-model-without-adapter": lambda e: (
        e.bench(model_entry("a", path="model")), "models.a: needs an adapter"),
    "pair-of-three": lambda e: (
        e.bench(put(pairs=[["a", "b"], ["a", "b", "a"]])),
        "pairs[1]: must be [\"source\", \"target\"] (got [\"a\", \"b\", \"a\"])"),
    "pair-a-string": lambda e: (
        e.bench(put(pairs=["a->b"])), "pairs[0]: must be [\"source\", \"target\"]"),
    "pairs-not-a-list": lambda e: (
        e.bench(put(pairs="some")), "pairs: \"all\" or a list of [\"source\", \"target\"]"),
    "pair-unknown-model": lambda e: (
        e.bench(put(pairs=[["a", "c"]])), "pairs[0]: names an unknown model 'c' (models: a, b)"),
    "pairs-empty": lambda e: (e.bench(put(pairs=[])), "pairs: no pair to run"),
    "limit-zero": lambda e: (
        e.bench(put(limit=0)), "bench.json: limit: must be a positive integer or null (got 0)"),
    "limit-negative": lambda e: (e.bench(put(limit=-1)), "limit: must be a positive integer"),
    "limit-string": lambda e: (
        e.bench(put(limit="10")), "limit: must be a positive integer or null (got \"10\")"),
    "batch-size-zero": lambda e: (
        e.bench(put(batch_size=0)), "batch_size: must be a positive integer (got 0)"),
    "n-resamples-float": lambda e: (
        e.bench(put(n_resamples=100.0)), "n_resamples: must be a positive integer (got 100.0)"),
    "methods-a-string": lambda e: (
        e.bench(put(methods="copy")), "methods: must be a non-empty list of method names"),
    "method-unknown": lambda e: (
        e.bench(put(methods=["copy", "magic"])), "methods: unknown method 'magic'; choose from"),
    "task-unknown": lambda e: (e.bench(put(tasks=["nope"])), "tasks: unknown task 'nope'"),
    "task-file-relative-missing": lambda e: (
        e.bench(put(tasks=["sub/none.json"])),
        f"tasks: cannot read task file {e.inputs / 'sub' / 'none.json'}"),
    "task-file-bad-row": lambda e: (
        e.make_task("qa2", [{"q": "wa", "options": ["wb", ""], "answer": 0}]),
        e.bench(put(tasks=["qa2.json"])), "tasks: task qa2 (validation, ")[1:],
    "task-data-is-a-fifo": lambda e: (
        (e.inputs / "qa.jsonl").unlink(), fifo(e.inputs / "qa.jsonl"), e.bench(),
        f"tasks: cannot read {e.inputs / 'qa.jsonl'}: a FIFO, not a regular file")[2:],
    "split-the-task-lacks": lambda e: (
        e.bench(put(split="test")), "split: no test split for qa (it has validation)"),
    "split-not-a-string": lambda e: (e.bench(put(split=["test"])), "split: must be a split name"),
    "device-unknown": lambda e: (e.bench(put(device="tpu9")), "device: tpu9: not a device"),
    "transfer-not-an-object": lambda e: (
        e.bench(put(transfer=["svd"])), "transfer: must be an object of transfer options"),
    "transfer-unknown-option": lambda e: (
        e.bench(put(transfer={"rank": 8})), "transfer: unknown option 'rank' (known: layer_map,"),
    "transfer-wrong-type": lambda e: (
        e.bench(put(transfer={"truncation_rank": "8"})),
        "transfer.truncation_rank: must be int or null (got \"8\")"),
    "transfer-bool-for-int": lambda e: (
        e.bench(put(transfer={"draws": True})), "transfer.draws: must be int (got true)"),
    "transfer-method-option": lambda e: (
        e.bench(put(transfer={"method": "copy"})), "transfer.method: set by the config's methods"),
    "transfer-bad-svd": lambda e: (
        e.bench(put(transfer={"svd": "magic"})), "transfer: svd magic: choose from"),
    "transfer-draws-for-copy": lambda e: (
        e.bench(put(transfer={"draws": 3})), "transfer: draws 3: only"),
    "out-is-a-file": lambda e: (e.bench(out=afile(e)), f"--out {e.work / 'afile'} is a file"),
}  # fmt: skip

INSPECT: dict[str, Build] = {
    "png-folder-missing": lambda e: (
        e.inspect("--png", str(e.work / "no" / "q.png")),
        f"--png {e.work / 'no' / 'q.png'}: folder {e.work / 'no'} does not exist"),
    "json-folder-missing": lambda e: (
        e.inspect("--json", str(e.work / "no" / "q.json")),
        f"--json {e.work / 'no' / 'q.json'}: folder {e.work / 'no'} does not exist"),
    "png-is-a-folder": lambda e: (
        e.inspect("--png", str(e.work)), f"--png {e.work} is a folder; name a file"),
    "json-is-a-folder": lambda e: (
        e.inspect("--json", str(e.work)), f"--json {e.work} is a folder; name a file"),
    "json-parent-is-a-file": lambda e: (
        e.inspect("--json", str(afile(e) / "q.json")), "is a file, not a folder"),
    "png-parent-not-writable": lambda e: (
        e.inspect("--png", str(no_write_permission(e) / "q.png")), "no permission to write in"),
    "png-is-the-source-config": lambda e: (
        e.inspect("--png", str(e.model / "config.json")),
        f"--png {e.model / 'config.json'} is the source model file"),
    "json-is-the-target-weights": lambda e: (
        e.inspect("--json", str(e.model2 / "model.safetensors")),
        f"--json {e.model2 / 'model.safetensors'} is the target model file"),
    "json-links-to-an-input": lambda e: (
        (e.work / "link.json").symlink_to(e.model / "config.json"),
        e.inspect("--json", str(e.work / "link.json")), "is the source model file")[1:],
    "png-and-json-the-same-file": lambda e: (
        e.inspect("--json", str(e.work / "q"), "--png", str(e.work / "q")),
        f"--json and --png both name {e.work / 'q'}"),
    "png-unknown-format": lambda e: (
        e.inspect("--png", str(e.work / "q.xyz")), "matplotlib cannot write .xyz files"),
}  # fmt: skip

CASES: dict[str, Build] = {
    **{f"eval-{k}": v for k, v in EVAL.items()},
    **{f"bench-{k}": v for k, v in BENCH.items()},
    **{f"inspect-{k}": v for k, v in INSPECT.items()},
}

UNREACHABLE = (
    "crosslora.cli.eval.load_model",  # eval: the model load
    "crosslora.eval.evaluate",
    "crosslora.pipeline.transfer",  # bench: transfers, evaluations, pulls, the runner
    "crosslora.zoo.models.pull",
    "crosslora.bench.runner.Runner",
    "crosslora.inspect.inspect_pair",  # inspect: the alignment
)


def snapshot(folder: Path) -> dict[str, bytes | str | None]:
    """Every path under ``folder``: a file's bytes, a link's target, None for a folder, and the
    mode of anything else (a FIFO is never opened)."""
    out: dict[str, bytes | str | None] = {}
    for p in sorted(folder.rglob("*")):
        mode = p.lstat().st_mode
        out[str(p.relative_to(folder))] = (
            None if stat.S_ISDIR(mode) else f"-> {os.readlink(p)}" if stat.S_ISLNK(mode)
            else p.read_bytes() if stat.S_ISREG(mode) else f"mode {mode:o}"
        )  # fmt: skip
    return out


def must_not_be_reached(*args, **kwargs):
    raise AssertionError("must not be reached")


@pytest.fixture
def env(tmp_path, tiny_model, tiny_adapter):
    yield Env(tmp_path, tiny_model, tiny_adapter)
    locked = tmp_path / "work" / "locked"
    if locked.exists():
        locked.chmod(0o755)


def one_error_line(code: int, err: str, fragment: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crosslora: error: "), lines
    assert fragment in lines[0], (fragment, lines[0])
    assert code == 2, (code, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_in_one_line_before_any_work(name, env, capsys, monkeypatch):
    for target in UNREACHABLE:
        monkeypatch.setattr(target, must_not_be_reached)
    argv, fragment = CASES[name](env)
    before = snapshot(env.tmp)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    one_error_line(code, captured.err, fragment)
    assert snapshot(env.tmp) == before  # no input changed, nothing written, no temporary file
    assert not (env.out / "adapters").exists() and not (env.out / "cache").exists()


def test_the_table_covers_every_command():
    assert len(EVAL) >= 15 and len(BENCH) >= 15 and len(INSPECT) >= 8
    assert len(CASES) >= 35


# --- through the console script: nothing but the one line (no library warning) -----------------


def test_console_script_shows_no_library_warning(env):
    """A successful eval with an adapter says nothing on stderr under -q (transformers' own
    deprecation warnings stay hidden), and a bad adapter or a bad bench config is one line."""
    runs = {
        "ok": (env.eval("--adapter", str(env.adapter)), None),
        "foreign": (env.eval("--adapter", str(a := env.foreign_adapter())),
                    f"adapter {a} does not fit model {env.model}"),
        "bench": (env.bench(put(limit=0)), "limit: must be a positive integer"),
    }  # fmt: skip
    cmd = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "crosslora"]
    procs = {
        name: subprocess.Popen(
            [*cmd, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"},
        )
        for name, (argv, _) in runs.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        fragment = runs[name][1]
        if fragment is None:
            assert proc.returncode == 0 and err == "", (name, err)
            assert "qa" in out
        else:
            one_error_line(proc.returncode, err, fragment)
    assert not env.out.exists()


# --- what is accepted ------------------------------------------------------------------------------


def test_bench_config_paths_resolve_from_its_folder(env, monkeypatch):
    """Relative paths from the config's folder, ``~`` expanded, ``pull:NAME`` checked but not
    pulled, "default" method, task files and the transfer cache folder resolved the same way."""
    from crosslora.bench import BenchConfig
    from crosslora.methods import DEFAULT_METHOD

    monkeypatch.setattr("crosslora.zoo.models.pull", must_not_be_reached)
    monkeypatch.setenv("HOME", str(env.tmp))
    env.bench(put(models={
        "a": {"path": "~/in/model", "adapter": "adapter"},
        "b": {"path": "pull:smollm2-135m", "adapter": str(env.adapter2)},
    }, methods=["default", "copy"], transfer={"cache_dir": "bases", "truncation_rank": None}))  # fmt: skip
    config = BenchConfig.from_json(env.config)
    assert config.models == {
        "a": {"path": str(env.model), "adapter": str(env.adapter)},
        "b": {"path": "pull:smollm2-135m", "adapter": str(env.adapter2)},
    }
    assert config.pairs == [("a", "b"), ("b", "a")]
    assert config.methods == [DEFAULT_METHOD, "copy"]
    assert config.tasks == [str(env.task)]
    assert config.transfer == {"cache_dir": str(env.inputs / "bases"), "truncation_rank": None}
    assert (config.limit, config.batch_size, config.n_resamples) == (4, 4, 50)


def test_acc_norm_of_an_empty_choice_raises_no_numpy_warning():
    from crosslora.eval.metrics import item_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = item_metrics([-3.0, 0.0, -1.0], [2, 0, 4], [1, 1, 1], gold=2)
    assert m["acc_norm"] == 1.0  # the empty choice scores -inf per character


def test_inspect_writes_its_files_whole_or_not_at_all(env, capsys, monkeypatch):
    """--json and --png go through a temporary file renamed into place; an interruption while
    the heatmap is written leaves no heatmap and no temporary file."""
    import crosslora.inspect

    png, js = env.work / "q.png", env.work / "q.json"
    assert main(env.inspect("--png", str(png), "--json", str(js))) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(js.read_text())["layers"]
    assert sorted(p.name for p in env.work.iterdir()) == ["q.json", "q.png"]
    assert capsys.readouterr().out.rstrip().endswith(f"heatmap: {png}")

    def interrupted(result, path, fmt=None):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(crosslora.inspect, "plot_heatmap", interrupted)
    png.unlink()
    assert main(env.inspect("--png", str(png))) == 130
    assert sorted(p.name for p in env.work.iterdir()) == ["q.json"]
