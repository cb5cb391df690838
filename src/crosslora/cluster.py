"""A batch of adapters spread over a Ray cluster: ``crosslora transfer --ray ADDRESS``.

Each Ray task runs the ordinary pipeline (``run_transfers``) on its adapters with the thread
count of the single-process run, so every output is that run's, tensor for tensor. The driver
checks every input and output before it starts or joins a cluster, and has the method's
preparation for the pair made once (in the pair cache, where the pipeline has one) before the
fan-out. Paths are made absolute (a worker has another working directory); inputs, outputs and
caches must be on a filesystem that every node sees, and crosslora installed on every node. Ray
is an optional extra (``crosslora[ray]``), imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from crosslora import pipeline
from crosslora.device import default_threads, set_threads
from crosslora.errors import CrossLoraError, one_line
from crosslora.io.output import check_output_path, check_separate
from crosslora.paths import crosslora_home
from crosslora.pipeline import TransferOptions, check_options, plan_transfers, run_transfers

log = logging.getLogger("crosslora")

LOCAL = "local"  # --ray local: a cluster on this machine, for this run only


def import_ray() -> ModuleType:
    """Ray, or one line that says how to install it."""
    try:
        import ray
    except ImportError:
        raise CrossLoraError("--ray needs Ray: pip install 'crosslora[ray]'") from None
    return ray


def run_on_cluster(
    adapters: list[str],
    source_model: str,
    target_model: str,
    outs: list[Path],
    options: TransferOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    address: str = LOCAL,
    threads: int | None = None,
) -> list[dict]:
    """``run_transfers`` with the adapters spread over the Ray cluster at ``address`` (``local``:
    one started for this call and stopped after it; an already connected Ray is used as it is).

    Each task asks for ``threads`` CPUs (default: ``default_threads()``), or one GPU when the
    device is CUDA, so the cluster's resources decide how many run at once. Returns the reports,
    in the adapters' order, each with ``report["ray"]``."""
    ray = import_ray()
    options = options or TransferOptions()
    threads = threads or default_threads()
    adapters = [_absolute(a) for a in adapters]
    source_model, target_model = _absolute(source_model), _absolute(target_model)
    outs = [Path(os.path.abspath(os.path.expanduser(out))) for out in outs]
    options, gpu, memory = _check(adapters, source_model, target_model, outs, options, overwrite)
    home = str(crosslora_home().absolute())
    owned = _connect(ray, address)
    created: list[Path] = []
    done = False
    try:
        workers = _workers(ray, threads, gpu, memory, address)
        created = _make_parents(outs)  # before the tasks, which would race to create them
        resources: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": threads}
        if memory:
            resources["memory"] = memory
        level, seen = log.getEffectiveLevel(), set()  # log lines from the tasks, shown once
        prepared = _prepare(ray, resources, adapters, source_model, target_model, options,
                            threads, home, level, seen)  # fmt: skip
        size = 1 if prepared is not None else -(-len(adapters) // workers)
        chunks = [list(range(i, min(i + size, len(adapters))))
                  for i in range(0, len(adapters), size)]  # fmt: skip
        task = ray.remote(_task).options(**resources)
        refs = {task.remote([adapters[i] for i in c], source_model, target_model,
                            [outs[i] for i in c], options, overwrite, threads, home, level): c
                for c in chunks}  # fmt: skip
        reports = _gather(ray, refs, adapters, progress, seen)
        done = True
    finally:
        if owned:
            ray.shutdown()
        if not done:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if nothing was written there
    info = {"address": address, "workers": workers,
            "pair_prepared": len(chunks) if prepared is None else int(bool(prepared["made"]))}
    if prepared is not None and "pair_fits" in prepared:  # made ahead, once, or read
        info["pair_fits"] = prepared["pair_fits"]
    for report in reports:
        report["ray"] = dict(info)
    return reports


def _absolute(name: str | os.PathLike[str]) -> str:
    """A local path made absolute; anything else (a hub id) as it is."""
    path = Path(os.path.expanduser(str(name)))
    return str(path.absolute()) if path.exists() else str(name)


def _check(
    adapters: list[str], source_model: str, target_model: str, outs: list[Path],
    options: TransferOptions, overwrite: bool,
) -> tuple[TransferOptions, bool, int]:  # fmt: skip
    """Everything the driver can check: the options, each output against the inputs, and a dry
    plan. Returns the tasks' options (device ``cuda`` or ``cpu``; a worker sees only the GPU it
    was given), whether they ask for a GPU, and the host memory a task needs (0: not stated)."""
    gpu = options.device.startswith("cuda") or (
        options.device == "auto" and torch.cuda.is_available()
    )
    local = options
    if gpu and not torch.cuda.is_available():  # a CPU-only driver: the GPUs are the cluster's
        with contextlib.suppress(RuntimeError, ValueError):
            torch.device(options.device)  # well formed, else check_options says so
            local = replace(options, device="cpu")
    check_options(local)
    if options.cache_dir:
        options = replace(options, cache_dir=os.path.abspath(os.path.expanduser(options.cache_dir)))
    given = pipeline._input_paths(adapters, source_model, target_model, options)  # the caches too
    for out in outs:
        check_separate(out, given)
        check_output_path(out, overwrite)
    batch, plans = plan_transfers(adapters, source_model, target_model, local)
    resolved = [("adapter", str(inputs.adapter.path)) for inputs in batch] + [
        ("source model", str(batch[0].src.checkpoint.path)),
        ("target model", str(batch[0].tgt.checkpoint.path)),
    ]
    for out in outs:
        check_separate(out, resolved)
    need = getattr(plans[0], "memory", None)
    tasks = replace(options, device="cuda" if gpu else "cpu")
    return tasks, gpu, int(getattr(need, "host", 0) or 0)


def _make_parents(outs: list[Path]) -> list[Path]:
    """The outputs' missing parent folders, created; returns them, outermost first."""
    created: list[Path] = []
    for out in outs:
        for folder in reversed([out.parent, *out.parent.parents]):
            if not folder.exists():
                try:
                    folder.mkdir()
                except OSError as err:
                    raise CrossLoraError(f"cannot write {folder}: {err.strerror or err}") from err
                created.append(folder)
    return created


def _connect(ray: ModuleType, address: str) -> bool:
    """Start (``local``) or join the cluster; True if this call must shut Ray down after."""
    if ray.is_initialized():
        return False
    if address not in (LOCAL, "auto"):
        _check_reachable(address)
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    try:
        ray.init(address="local" if address == LOCAL else address, **quiet)
    except Exception as err:  # ConnectionError, ValueError, RuntimeError: a bad address
        causes, cause = [], err.__cause__ or err.__context__
        while cause is not None and len(causes) < 5:
            causes.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        token = "AuthToken" in " ".join(causes)
        hint = ("; the cluster asks for a token: set RAY_AUTH_MODE=token, with its token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN") * token  # fmt: skip
        raise CrossLoraError(f"--ray {address}: cannot start or join the cluster: "
                             f"{one_line(err, 'head')}{hint}") from err  # fmt: skip
    return True


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """One line at once if nothing answers at ``host:port`` (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CrossLoraError(f"--ray {address}: expected HOST:PORT of the cluster's head, "
                             "'auto' or 'local'")  # fmt: skip
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as err:
        raise CrossLoraError(f"--ray {address}: nothing answers there ({err.strerror or err}); "
                             "is the cluster's head running?") from err  # fmt: skip


def _workers(ray: ModuleType, threads: int, gpu: bool, memory: int, address: str) -> int:
    """How many tasks the cluster's live nodes can run at once; one line if none fits."""
    fits = 0
    for node in ray.nodes():
        have = node.get("Resources", {}) if node.get("Alive") else {}
        slots = math.floor(have.get("GPU", 0)) if gpu else math.floor(have.get("CPU", 0) / threads)
        if memory:
            slots = min(slots, math.floor(have.get("memory", 0) / memory))
        fits += slots
    if fits < 1:
        what = "one GPU" if gpu else f"{threads} CPUs (--threads {threads})"
        mem = f" and {memory / 1e9:.1f} GB of memory" if memory else ""
        raise CrossLoraError(f"--ray {address}: no node of the cluster has what a task asks for: "
                             f"{what}{mem}")  # fmt: skip
    return fits


def _prepare(
    ray: ModuleType, resources: dict[str, Any], adapters: list[str], source_model: str,
    target_model: str, options: TransferOptions, threads: int, home: str, level: int,
    seen: set[str],
) -> dict | None:  # fmt: skip
    """The pair's preparation, and the fits the adapters' modules read, made once, on the
    cluster, into the pair cache: the cache's counts (``prepare_pair``); None without a pair
    cache (each task then prepares for itself)."""
    if not options.cache:
        return None
    task = ray.remote(_prepare_task).options(**resources)
    out = _result(ray, task.remote(adapters, source_model, target_model, options, threads, home,
                                   level))  # fmt: skip
    if isinstance(out, str):
        raise CrossLoraError(out)
    _show(out["logs"], seen)
    return out["stats"]


def _gather(ray: ModuleType, refs: dict[Any, list[int]], adapters: list[str], progress: bool,
            seen: set[str]) -> list[dict]:  # fmt: skip
    """Every task's reports in the adapters' order, with a bar over finished adapters; the first
    error cancels the tasks still running and is raised as one line."""
    reports: list[dict | None] = [None] * len(adapters)
    pending = list(refs)
    bar = tqdm(total=len(adapters), desc="transfer (Ray)", unit="adapter", disable=not progress)
    try:
        with bar:
            while pending:
                (ref,), pending = ray.wait(pending, num_returns=1)
                chunk = refs[ref]
                out = _result(ray, ref)
                if isinstance(out, str):
                    written = sum(r is not None for r in reports)
                    where = f"{adapters[chunk[0]]}: " if len(chunk) == 1 else ""
                    raise CrossLoraError(f"{where}{out} ({written} of {len(adapters)} adapters "
                                         "were written before it)")  # fmt: skip
                for i, report in zip(chunk, out["reports"]):
                    reports[i] = report
                _show(out["logs"], seen)
                bar.update(len(chunk))
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
    return [r for r in reports if r is not None]


def _show(lines: list[tuple[int, str]], seen: set[str]) -> None:
    """A task's log lines, here; each line once (every task says what to expect)."""
    for level, message in lines:
        if message not in seen:
            seen.add(message)
            log.log(level, "%s", message)


def _result(ray: ModuleType, ref: Any) -> Any:
    """A task's value; a Ray failure (a lost node, a killed worker) as one line; a bug in the
    task as the exception it raised."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except ray.exceptions.RayError as err:
        return f"the Ray task failed: {one_line(err, 'head')}"


# --- run on the workers ----------------------------------------------------------------------


class _Lines(logging.Handler):
    """Keeps a task's log lines, for the driver to show."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


@contextlib.contextmanager
def _as_driver(threads: int, home: str, level: int) -> Iterator[list[tuple[int, str]]]:
    """The driver's settings in a worker: its thread count (Ray sets ``OMP_NUM_THREADS`` to a
    task's CPUs, 1 for a GPU task), its ``CROSSLORA_HOME``; yields the log lines to send back."""
    set_threads(threads)
    previous = os.environ.get("CROSSLORA_HOME")
    os.environ["CROSSLORA_HOME"] = home
    handler = _Lines(level)
    before = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(before)
        if previous is None:
            os.environ.pop("CROSSLORA_HOME", None)
        else:
            os.environ["CROSSLORA_HOME"] = previous


def _task(
    adapters: list[str], source_model: str, target_model: str, outs: list[Path],
    options: TransferOptions, overwrite: bool, threads: int, home: str, level: int,
) -> dict | str:  # fmt: skip
    """One Ray task: these adapters through the pipeline. Returns the reports and log lines, or
    a user error's one line."""
    with _as_driver(threads, home, level) as lines:
        try:
            reports = run_transfers(adapters, source_model, target_model, outs, options,
                                    overwrite, progress=False)  # fmt: skip
        except CrossLoraError as err:
            return one_line(err)
    return {"reports": reports, "logs": lines}


def _prepare_task(
    adapters: list[str], source_model: str, target_model: str, options: TransferOptions,
    threads: int, home: str, level: int,
) -> dict | str:  # fmt: skip
    """The pair's preparation as a Ray task: its stats and log lines, or a user error's line."""
    with _as_driver(threads, home, level) as lines:
        try:
            stats = pipeline.prepare_pair(adapters, source_model, target_model, options)
        except CrossLoraError as err:
            return one_line(err)
    return {"stats": stats, "logs": lines}
