"""Output safety: nothing a user does with ``--out-path`` / ``--out`` destroys their files.

Every case checks the exit code, the one error line, and that every input (and every other file
under the test's folder) is byte for byte what it was. The classes:

- an output that is, contains or lies inside an input (adapter, source or target model, cache),
  with and without ``--overwrite``, single and batch transfers, and ``bench --out``;
- ``--overwrite`` replaces only a folder crosslora wrote, unchanged, or an empty one;
- two runs to one new output folder: exactly one wins, and its output is whole;
- leftovers of killed runs are removed by the next run in that folder, never a user's folder;
- output folders get the user's umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import copy_folder, snapshot, transfer_argv
from crosslora.cli import main
from crosslora.errors import CrossLoraError
from crosslora.io.output import (
    BENCH_MARKER,
    MARKER,
    OutputClaim,
    _make_staging,
    _why_not_ours,
    claim_bench_folder,
    claim_outputs,
    remove_stale,
)
from crosslora.io.peft_adapter import read_adapter

SRC = Path(__file__).resolve().parents[1] / "src"


class Tree:
    """Inputs, each in a folder of its own under ``tmp/in``: ``a/adapter``, ``s/src``, ``t/tgt``,
    ``c/cache`` and a batch of two adapters ``b/ad1``, ``b/ad2``; outputs go under ``tmp/work``."""

    def __init__(self, tmp: Path, tiny_model, tiny_adapter) -> None:
        self.tmp = tmp
        self.inputs = tmp / "in"
        self.adapter = copy_folder(tiny_adapter("llama"), self.inputs / "a/adapter")
        self.src = copy_folder(tiny_model("llama"), self.inputs / "s/src")
        self.tgt = copy_folder(tiny_model("llama-twin"), self.inputs / "t/tgt")
        self.cache = self.inputs / "c" / "cache"
        self.cache.mkdir(parents=True)
        (self.cache / "keep.txt").write_text("a cache entry")
        self.batch = self.inputs / "b"
        for name in ("ad1", "ad2"):
            copy_folder(tiny_adapter("llama"), self.batch / name)
        self.work = tmp / "work"
        self.work.mkdir()

    def argv(
        self, out: Path, *extra: str, adapter: Path | None = None, method: str = "copy"
    ) -> list[str]:
        """A quiet transfer of the tree's adapter (or ``adapter``), with the tree's cache."""
        return transfer_argv(adapter or self.adapter, self.src, self.tgt, out, method, "-q",
                             "--cache-dir", self.cache, *extra)  # fmt: skip


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code: int, err: list[str], fragment: str) -> None:
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("crosslora: error: "), err
    assert fragment in err[0], (fragment, err[0])


@pytest.fixture
def tree(tmp_path, tiny_model, tiny_adapter) -> Tree:
    return Tree(tmp_path, tiny_model, tiny_adapter)


# --- an output that overlaps an input -----------------------------------------------------------

# name -> (the output path, relative to the tree, and the error's fragment)
OVERLAPS: dict[str, tuple[Callable[[Tree], Path], str]] = {
    "is-the-adapter": (lambda t: t.adapter, "is the adapter"),
    "contains-the-adapter": (lambda t: t.adapter.parent, "contains the adapter"),
    "inside-the-adapter": (lambda t: t.adapter / "out", "lies inside the adapter"),
    "is-the-source-model": (lambda t: t.src, "is the source model"),
    "contains-the-source-model": (lambda t: t.src.parent, "contains the source model"),
    "inside-the-source-model": (lambda t: t.src / "sub" / "out", "lies inside the source model"),
    "is-the-target-model": (lambda t: t.tgt, "is the target model"),
    "contains-the-target-model": (lambda t: t.tgt.parent, "contains the target model"),
    "inside-the-target-model": (lambda t: t.tgt / "out", "lies inside the target model"),
    "is-the-cache": (lambda t: t.cache, "is the basis cache"),
    "contains-the-cache": (lambda t: t.cache.parent, "contains the basis cache"),
    "inside-the-cache": (lambda t: t.cache / "out", "lies inside the basis cache"),
    "contains-every-input": (lambda t: t.inputs, "contains the adapter"),
    "a-whole-project-folder": (lambda t: t.tmp, "contains the adapter"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("name", list(OVERLAPS))
def test_output_overlapping_an_input_is_refused(name, overwrite, tree, capsys):
    where, fragment = OVERLAPS[name]
    out = where(tree)
    before = snapshot(tree.tmp)
    code, err = run(tree.argv(out, *(["--overwrite"] if overwrite else [])), capsys)
    assert_refused(code, err, fragment)
    assert snapshot(tree.tmp) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_output_through_a_symlink_to_an_input_is_refused(overwrite, tree, capsys):
    link = tree.work / "link"
    link.symlink_to(tree.adapter, target_is_directory=True)
    before = snapshot(tree.tmp)
    code, err = run(tree.argv(link, *(["--overwrite"] if overwrite else [])), capsys)
    assert_refused(code, err, "is the adapter")
    assert snapshot(tree.tmp) == before


BATCH_OVERLAPS: dict[str, tuple[Callable[[Tree], Path], str]] = {
    "out-is-the-batch-folder": (lambda t: t.batch, "is the adapter"),
    "out-inside-an-adapter": (lambda t: t.batch / "ad1", "lies inside the adapter"),
    "out-inside-the-source-model": (lambda t: t.src, "lies inside the source model"),
    "out-inside-the-cache": (lambda t: t.cache, "lies inside the basis cache"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("name", list(BATCH_OVERLAPS))
def test_batch_output_overlapping_an_input_is_refused(name, overwrite, tree, capsys):
    where, fragment = BATCH_OVERLAPS[name]
    before = snapshot(tree.tmp)
    argv = tree.argv(where(tree), *(["--overwrite"] if overwrite else []), adapter=tree.batch)
    code, err = run(argv, capsys)
    assert_refused(code, err, fragment)
    assert snapshot(tree.tmp) == before


def write_bench_config(tree: Tree) -> Path:
    config = tree.work / "bench.json"
    config.write_text(json.dumps({
        "models": {"a": {"path": str(tree.src), "adapter": str(tree.adapter)},
                   "b": {"path": str(tree.tgt), "adapter": str(tree.batch / "ad1")}},
        "pairs": [["a", "b"]], "methods": ["copy"], "tasks": ["arc_easy"], "limit": 2,
    }))  # fmt: skip
    return config


BENCH_OUTS: dict[str, tuple[Callable[[Tree], Path], str]] = {
    "is-a-model": (lambda t: t.src, "is the model of a"),
    "contains-a-model": (lambda t: t.tgt.parent, "contains the model of b"),
    "inside-a-model": (lambda t: t.tgt / "runs", "lies inside the model of b"),
    "is-an-adapter": (lambda t: t.adapter, "is the adapter of a"),
    "contains-an-adapter": (lambda t: t.batch, "contains the adapter of b"),
    "inside-an-adapter": (lambda t: t.adapter / "runs", "lies inside the adapter of a"),
    "a-folder-of-the-users": (lambda t: t.cache, "is not a crosslora bench folder"),
}


@pytest.mark.parametrize("name", list(BENCH_OUTS))
def test_bench_out_that_is_not_its_own_is_refused(name, tree, capsys):
    where, fragment = BENCH_OUTS[name]
    config = write_bench_config(tree)
    before = snapshot(tree.tmp)
    code, err = run(["bench", "-q", str(config), "--out", str(where(tree))], capsys)
    assert_refused(code, err, fragment)
    assert snapshot(tree.tmp) == before


def test_bench_folder_is_resumed_and_held_by_one_run(tmp_path):
    """A folder a benchmark wrote is taken again; while one run holds it, a second is refused."""
    out = tmp_path / "runs" / "bench"
    with claim_bench_folder(out, []) as folder:
        assert (folder / BENCH_MARKER).is_file()
        (folder / "results.json").write_text("{}")
        with pytest.raises(CrossLoraError, match="another crosslora run is writing"):
            with claim_bench_folder(out, []):
                pass
    with claim_bench_folder(out, []) as folder:  # resumed
        assert (folder / "results.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == [BENCH_MARKER, "results.json"]


# --- what --overwrite may replace ---------------------------------------------------------------


def written(tree: Tree, capsys, out: Path | None = None) -> Path:
    """A transfer's output (crosslora's own) at ``out``."""
    out = out or tree.work / "out"
    code, err = run(tree.argv(out), capsys)
    assert code == 0, err
    return out


def _edit(path: Path, text: str) -> None:
    path.write_text(text)


# name -> (how to change a crosslora output before --overwrite, the error's fragment)
TAMPERED: dict[str, tuple[Callable[[Path], object], str]] = {
    "a-file-of-the-users-added": (lambda o: _edit(o / "notes.txt", "mine"),
                                  "holds files crosslora did not write (notes.txt)"),
    "a-folder-of-the-users-added": (lambda o: (o / "data").mkdir(),
                                    "holds files crosslora did not write (data)"),
    "the-model-card-edited": (lambda o: _edit(o / "README.md", "my own card"),
                              "README.md was changed after crosslora wrote it"),
    "the-weights-replaced": (lambda o: (o / "adapter_model.safetensors").write_bytes(b"x" * 9),
                             "adapter_model.safetensors was changed"),
    "a-file-removed": (lambda o: (o / "transfer_report.json").unlink(),
                       "files crosslora wrote there are gone (transfer_report.json)"),
    "the-marker-removed": (lambda o: (o / MARKER).unlink(), "was not written by crosslora"),
    "the-marker-not-json": (lambda o: _edit(o / MARKER, "{"), "is not one crosslora wrote"),
    "the-marker-without-files": (lambda o: _edit(o / MARKER, '{"crosslora": "output"}'),
                                 "is not one crosslora wrote"),
    "the-marker-forged-empty": (lambda o: _edit(o / MARKER, '{"files": {}}'),
                                "holds files crosslora did not write"),
    "a-file-replaced-by-a-link": (
        lambda o: ((o / "README.md").unlink(), (o / "README.md").symlink_to(o / MARKER)),
        "README.md was changed"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TAMPERED))
def test_overwrite_refuses_an_output_that_is_no_longer_crosslora_s(name, tree, capsys):
    out = written(tree, capsys)
    change, fragment = TAMPERED[name]
    change(out)
    before = snapshot(tree.tmp)
    code, err = run(tree.argv(out, "--overwrite"), capsys)
    assert_refused(code, err, f"refusing to replace {out}: ")
    assert fragment in err[0], err
    assert snapshot(tree.tmp) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_folder_of_the_users_is_never_replaced(overwrite, tree, capsys):
    out = tree.work / "project"
    out.mkdir()
    (out / "train.py").write_text("print('my work')")
    before = snapshot(tree.tmp)
    code, err = run(tree.argv(out, *(["--overwrite"] if overwrite else [])), capsys)
    assert_refused(code, err, "refusing to replace" if overwrite else "is not empty")
    assert snapshot(tree.tmp) == before


def test_overwrite_replaces_crosslora_s_own_output(tree, capsys):
    out = written(tree, capsys)
    assert _why_not_ours(out) is None
    first = snapshot(out)
    # crop-pad writes a different adapter, so that the change shows
    code, err = run(tree.argv(out, "--overwrite", method="crop-pad"), capsys)
    assert code == 0, err
    assert snapshot(out) != first and _why_not_ours(out) is None
    assert [p.name for p in tree.work.iterdir()] == ["out"]  # nothing left beside it


def test_an_empty_folder_is_written_into(tree, capsys):
    out = tree.work / "empty"
    out.mkdir()
    assert written(tree, capsys, out) == out and _why_not_ours(out) is None


def test_a_symlinked_output_is_written_through_and_leaves_nothing(tree, capsys):
    """The link keeps pointing at the (new) folder; no stale staging link or folder remains."""
    real = tree.work / "real"
    link = tree.work / "link"
    link.symlink_to(real, target_is_directory=True)
    code, err = run(tree.argv(link), capsys)  # the link points at nothing yet
    assert_refused(code, err, "is a symbolic link to nothing")
    real.mkdir()
    written(tree, capsys, link)
    code, err = run(tree.argv(link, "--overwrite"), capsys)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _why_not_ours(real) is None
    assert sorted(p.name for p in tree.work.iterdir()) == ["link", "real"]


def test_a_batch_overwrite_is_all_or_nothing(tree, capsys):
    """One output of a batch is not crosslora's: none is written or replaced."""
    parent = tree.work / "outs"
    code, err = run(tree.argv(parent, adapter=tree.batch), capsys)
    assert code == 0, err
    (parent / "ad2" / "notes.txt").write_text("mine")
    before = snapshot(tree.tmp)
    code, err = run(tree.argv(parent, "--overwrite", adapter=tree.batch, method="crop-pad"), capsys)
    assert_refused(code, err, f"refusing to replace {parent / 'ad2'}")
    assert snapshot(tree.tmp) == before


# --- one writer at a time ----------------------------------------------------------------------


def test_a_claimed_output_cannot_be_claimed_again(tmp_path):
    out = tmp_path / "out"
    with claim_outputs([out], False):
        with pytest.raises(CrossLoraError, match=f"another crosslora run is writing {out}"):
            with claim_outputs([out], False):
                pass
    with claim_outputs([out], False):  # released: free again
        pass
    assert list(tmp_path.iterdir()) == []  # the lock file went with the claim


def test_a_folder_that_appears_after_the_claim_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    claim = OutputClaim(out, overwrite=True)
    claim.acquire()
    try:
        with pytest.raises(CrossLoraError, match="appeared while this run was working"):
            with claim.staged() as tmp:
                (tmp / "a.txt").write_text("new")
                out.mkdir()  # another program creates it meanwhile
                (out / "theirs.txt").write_text("theirs")
    finally:
        claim.release()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_replaced_after_the_claim_is_not_replaced(tree, capsys):
    out = written(tree, capsys)
    claim = OutputClaim(out, overwrite=True)
    claim.acquire()
    try:
        with pytest.raises(CrossLoraError, match="was replaced while this run was working"):
            with claim.staged() as tmp:
                (tmp / "a.txt").write_text("new")
                out.rename(tree.work / "aside")  # kept, so that its inode is not reused
                out.mkdir()
                (out / "theirs.txt").write_text("theirs")
    finally:
        claim.release()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_an_output_tampered_with_during_the_run_is_not_replaced(tree, capsys):
    out = written(tree, capsys)
    claim = OutputClaim(out, overwrite=True)
    claim.acquire()
    try:
        with pytest.raises(CrossLoraError, match="holds files crosslora did not write"):
            with claim.staged() as tmp:
                (tmp / "a.txt").write_text("new")
                (out / "notes.txt").write_text("mine")
    finally:
        claim.release()
    assert (out / "notes.txt").read_text() == "mine"


ROUNDS = 6
RACES: list[str] = []  # the losers' lines (CROSSLORA_OUTCOMES=1 prints them)


def test_two_runs_to_one_new_folder_exactly_one_wins(tree):
    """Two console-script transfers to the same new folder, started together, ROUNDS times."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "crosslora"]
    for i in range(ROUNDS):
        out = tree.work / f"race{i}"
        argv = tree.argv(out)
        with contextlib.ExitStack() as stack:
            procs = []
            for _ in range(2):
                p = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
                stack.callback(lambda p=p: p.poll() is None and (p.kill(), p.wait()))
                procs.append(p)
            results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        (loser,) = [err for code, err in results if code == 2]
        lines = loser.strip().splitlines()
        assert len(lines) == 1 and (
            "another crosslora run is writing" in lines[0] or "is not empty" in lines[0]
        ), lines
        RACES.append(lines[0])
        assert _why_not_ours(out) is None  # the survivor's files, whole and as listed
        assert read_adapter(out).modules
        assert sorted(p.name for p in tree.work.iterdir() if p.name.startswith(f".race{i}")) == []
    if os.environ.get("CROSSLORA_OUTCOMES"):
        print("\n".join(f"round {i}: {line}" for i, line in enumerate(RACES)))


# --- leftovers --------------------------------------------------------------------------------


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def staging_of(out: Path, pid: int, kind: str = "tmp") -> Path:
    """A staging folder as a run with process id ``pid`` would have left it."""
    folder = _make_staging(out, kind)
    renamed = folder.with_name(folder.name.replace(f"-{os.getpid()}-", f"-{pid}-"))
    folder.rename(renamed)
    marker = json.loads((renamed / MARKER).read_text())
    (renamed / MARKER).write_text(json.dumps({**marker, "pid": pid}))
    return renamed


def test_a_killed_run_s_staging_is_removed_by_the_next_run_in_that_folder(tree, capsys):
    """Not only a run to the same name: any run that writes in that parent folder."""
    dead = staging_of(tree.work / "other-name", dead_pid())
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    written(tree, capsys)
    assert not dead.exists()


def test_a_live_run_s_staging_is_kept(tree, capsys):
    live = _make_staging(tree.work / "other-name", "tmp")
    written(tree, capsys)
    assert live.is_dir()


def test_a_user_folder_named_like_staging_is_kept(tree, capsys):
    """Named as a staging folder of a dead run, but no crosslora marker inside: not ours."""
    name = staging_of(tree.work / "x", dead_pid()).name
    shutil.rmtree(tree.work / name)
    mine = tree.work / name
    mine.mkdir()
    (mine / "data.txt").write_text("mine")
    written(tree, capsys)
    assert (mine / "data.txt").read_text() == "mine"


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(tree, capsys):
    out = written(tree, capsys)
    before = snapshot(out)
    old = staging_of(out, dead_pid(), "old")
    out.rename(old / "previous")
    assert remove_stale(tree.work) == [old]
    assert snapshot(out) == before


def test_stale_lock_files_are_removed_and_held_ones_kept(tmp_path):
    stale = tmp_path / ".gone.crosslora-lock"
    stale.write_text("12345\n")
    with claim_outputs([tmp_path / "held"], False):
        remove_stale(tmp_path)
        assert not stale.exists()
        assert (tmp_path / ".held.crosslora-lock").exists()


# --- permissions ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_output_folder_follows_the_umask(umask, tree, capsys):
    previous = os.umask(umask)
    try:
        out = written(tree, capsys, tree.work / "new" / "out")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out.parent).stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
