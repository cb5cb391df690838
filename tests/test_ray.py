"""``transfer --ray``: a batch spread over a real Ray cluster (one started here with ``ray start``,
and ``--ray local``) writes what the single-process batch writes, tensor for tensor; what can be
checked before the cluster starts fails there, in one line, and so does a task's error."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_folder, transfer_argv
from crosslora.cli import main
from crosslora.pipeline import TransferOptions, batch_outputs, transfer_batch

pytestmark = pytest.mark.ray
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'crosslora[ray]')")  # fmt: skip
RAY = str(Path(sys.executable).with_name("ray"))
NAMES = ("a1", "a2", "a3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_tensors(a: Path, b: Path) -> None:
    for name in NAMES:
        ta = load_file(a / name / "adapter_model.safetensors")
        tb = load_file(b / name / "adapter_model.safetensors")
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("crosslora: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """This module's ``CROSSLORA_HOME`` (the basis and pair caches)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("home")
        mp.setenv("CROSSLORA_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def batch(tiny_model, tiny_adapter, tmp_path_factory):
    """Three adapters on llama, and the pair they go between (llama -> llama-deep)."""
    root = tmp_path_factory.mktemp("batch")
    adapters = [copy_folder(tiny_adapter("llama", seed=i + 1), root / n) for i, n in enumerate(NAMES)]
    return adapters, tiny_model("llama"), tiny_model("llama-deep")


@pytest.fixture(scope="module")
def reference(batch, home, tmp_path_factory):
    """``reference(method)``: the single-process batch's output folder (made once)."""
    made: dict[str, Path] = {}

    def make(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp(f"single-{method}") / "out"
            adapters, src, tgt = batch
            transfer_batch([str(a) for a in adapters], str(src), str(tgt), out,
                           TransferOptions(method=method), progress=False)  # fmt: skip
            made[method] = out
        return made[method]

    return make


@pytest.fixture(scope="module")
def cluster(home, tmp_path_factory):
    """A real two-CPU Ray cluster on this machine, its workers with another CROSSLORA_HOME and
    without OMP_NUM_THREADS (Ray sets it per task): the address. It asks for Ray's token
    (``~/.ray/auth_token``), and so does this process: Ray reads ``RAY_AUTH_MODE`` when it is
    first imported, and enables tokens by itself only for a cluster it starts."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'crosslora[ray]')")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["CROSSLORA_HOME"] = str(tmp_path_factory.mktemp("workers") / "home")
    env["RAY_AUTH_MODE"] = "token"
    cmd = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
           "--disable-usage-stats", "--node-ip-address=127.0.0.1"]  # fmt: skip
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True)
    started = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_AUTH_MODE", "token")
            if "ray" in sys.modules:  # imported before: its settings read again
                from ray._raylet import Config

                Config.initialize("")
            yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    # the workers used the driver's CROSSLORA_HOME, not their own
    assert not Path(env["CROSSLORA_HOME"]).exists()


def test_a_batch_on_a_cluster_is_the_single_process_batch(batch, reference, cluster, tmp_path):
    """The default method through the API, with a cache of its own: the same tensors; the pair
    and its fits are prepared once, before the fan-out, and every task reads them."""
    from crosslora.cluster import run_on_cluster

    adapters, src, tgt = batch
    names = [str(a) for a in adapters]
    options = TransferOptions(cache_dir=str(tmp_path / "cache"))
    reports = run_on_cluster(names, str(src), str(tgt), batch_outputs(names, tmp_path / "out"),
                             options, progress=False, address=cluster, threads=1)  # fmt: skip
    assert_same_tensors(tmp_path / "out", reference("matched"))
    assert [r["source_adapter"] for r in reports] == names
    ray_info = reports[0]["ray"]
    assert ray_info["address"] == cluster and ray_info["workers"] == 2
    assert ray_info["pair_prepared"] == 1
    assert [r["pair_cache"]["made"] for r in reports] == [0, 0, 0]
    uses = sum(ray_info["pair_fits"].values())  # the fits too: made once, ahead
    assert ray_info["pair_fits"]["made"] > 0
    assert [r["method_diagnostics"]["pair_fits"] for r in reports] == [{"read": uses, "made": 0}] * 3


def test_a_streaming_method_from_relative_paths(batch, reference, cluster, tmp_path,
                                                monkeypatch, capsys):  # fmt: skip
    """cross-lora through the command line, every path relative: the workers run elsewhere."""
    adapters, src, tgt = batch
    monkeypatch.chdir(adapters[0].parent)
    argv = transfer_argv(NAMES, os.path.relpath(src), os.path.relpath(tgt),
                         os.path.relpath(tmp_path / "out"), "cross-lora", "-q", "--ray", cluster)  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [os.path.relpath(tmp_path / "out" / n) for n in NAMES]
    assert captured.err.count("warning: ") == 1  # each task's warning, shown once
    assert_same_tensors(tmp_path / "out", reference("cross-lora"))


@needs_ray
def test_a_local_cluster_for_the_run(batch, reference, tmp_path, monkeypatch):
    """``--ray local`` starts a cluster for the run and stops it after."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what Ray would set for good, for this test
    adapters, src, tgt = batch
    argv = transfer_argv(adapters, src, tgt, tmp_path / "out", None, "-q", "--ray", "local")
    assert main(argv) == 0
    assert not ray.is_initialized()
    assert_same_tensors(tmp_path / "out", reference("matched"))


def test_a_task_computes_with_the_drivers_threads_and_home(tmp_path):
    """Ray sets OMP_NUM_THREADS to a task's CPUs (1 for a GPU task): a task computes with the
    driver's thread count instead, and its CROSSLORA_HOME, and puts the worker's back after."""
    from crosslora.cluster import _as_driver

    before, home = torch.get_num_threads(), os.environ.get("CROSSLORA_HOME")
    try:
        with _as_driver(2, str(tmp_path), 30) as lines:
            assert torch.get_num_threads() == 2
            assert os.environ["CROSSLORA_HOME"] == str(tmp_path)
            logging.getLogger("crosslora").warning("sent back")
            logging.getLogger("crosslora").info("not asked for")
        assert lines == [(30, "sent back")]
        assert os.environ.get("CROSSLORA_HOME") == home
    finally:
        torch.set_num_threads(before)


def test_a_task_asking_for_more_than_any_node_has_is_refused(batch, cluster, tmp_path, capsys):
    adapters, src, tgt = batch
    argv = transfer_argv(adapters, src, tgt, tmp_path / "new" / "out", "cross-lora", "-q", "--ray",
                         cluster, "--threads", "3")  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith("no node of the cluster has what a task asks for: 3 CPUs (--threads 3)")
    assert not (tmp_path / "new").exists()  # the folders made for the outputs are gone


def test_an_error_in_a_task_is_one_line(batch, tiny_model, cluster, tmp_path, capsys):
    """The default method cannot fit its maps between these tokenizers: found on the cluster."""
    adapters, src, _ = batch
    argv = transfer_argv(adapters, src, tiny_model("qwen2"), tmp_path / "out", None, "-q",
                         "--ray", cluster)  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err)
    assert not any((tmp_path / "out").glob("*/adapter_model.safetensors"))


@needs_ray
def test_bad_input_fails_before_the_cluster_starts(batch, tmp_path, monkeypatch, capsys):
    import ray

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(ray, "init", no_cluster)
    adapters, src, tgt = batch
    inside = transfer_argv(adapters, src, tgt, adapters[0] / "out", None, "--ray", "local")
    missing = transfer_argv([*adapters, tmp_path / "nowhere"], src, tgt, tmp_path / "o", None,
                            "--ray", "local")  # fmt: skip
    # lora-x needs equal shapes: every module of the plan is skipped
    nothing = transfer_argv(adapters, src, tgt, tmp_path / "o", "lora-x", "--ray", "local")
    # and a head that is not there: one line at once (Ray itself would retry for minutes)
    gone = transfer_argv(adapters, src, tgt, tmp_path / "o", None, "--ray",
                         f"127.0.0.1:{free_port()}")  # fmt: skip
    for argv, said in ((inside, "lies inside the adapter"), (missing, "nowhere"),
                       (nothing, "nothing to transfer"), (gone, "nothing answers there")):  # fmt: skip
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert said in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_without_ray_it_is_one_line(batch, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as when it is not installed
    adapters, src, tgt = batch
    capsys.readouterr()
    assert main(transfer_argv(adapters, src, tgt, tmp_path / "out", None, "--ray", "local")) == 2
    assert capsys.readouterr().err == (
        "crosslora: error: --ray needs Ray: pip install 'crosslora[ray]'\n"
    )
    assert not (tmp_path / "out").exists()
